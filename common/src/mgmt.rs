//! Management-service messages: system membership, pools, containers and
//! OID allocation.
//!
//! Names: every pool or container argument is a [`Name`]: the label or the
//! UUID string, resolved by the management service.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Limit, Result, ShoalError};
use crate::ids::{ContId, PoolId};
use crate::limits::MAX_NAME_LEN;
use crate::msg::{Opcode, Rpc};
use crate::placement::PoolMap;

/// A pool or container named by label or UUID.
pub type Name = String;

/// Checks a label: 1..=MAX_NAME_LEN bytes of letters, digits, `-`, `_`, `.`,
/// not parseable as a UUID (so names never collide with ids).
pub fn check_label(what: &str, label: &str) -> Result<()> {
    if label.len() > MAX_NAME_LEN {
        return Err(ShoalError::TooLarge { limit: Limit::NameLen, size: label.len() as u64, max: MAX_NAME_LEN as u64 });
    }
    if label.is_empty() {
        return Err(ShoalError::invalid(format!("a {what} label must not be empty")));
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
    if name.len() > MAX_NAME_LEN {
        return Err(ShoalError::TooLarge { limit: Limit::NameLen, size: name.len() as u64, max: MAX_NAME_LEN as u64 });
    }
    if name.is_empty() {
        return Err(ShoalError::invalid(format!("a {what} name must not be empty")));
    }
    Ok(())
}

fn no_segments(segments: &[Bytes]) -> Result<()> {
    if !segments.is_empty() {
        return Err(ShoalError::invalid("a management request carries no data segments"));
    }
    Ok(())
}

/// Implements [`Rpc`] for a management request: no bulk segments, then the
/// given checks on the request.
macro_rules! mgmt_rpc {
    ($req:ty, $op:ident, $reply:ty) => {
        mgmt_rpc!($req, $op, $reply, |_req| { Ok(()) });
    };
    ($req:ty, $op:ident, $reply:ty, |$r:ident| $check:block) => {
        impl Rpc for $req {
            const OP: Opcode = Opcode::$op;
            type Reply = $reply;

            fn validate(&self, segments: &[Bytes]) -> Result<()> {
                no_segments(segments)?;
                let $r = self;
                $check
            }
        }
    };
}

/// A server's standing in the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// Joined and heard from recently.
    Joined,
    /// Joined, but silent for longer than the heartbeat timeout.
    Unresponsive,
    /// Declared down: its targets are `DOWN` in every pool (writes go on
    /// without them); excluded after the grace time.
    Down,
    /// Excluded: its targets are `DOWNOUT`; their shards are rebuilt on
    /// other servers.
    Excluded,
}

/// One server of the system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub rank: u32,
    #[serde(with = "crate::ids::uuid_u128")]
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
    #[serde(with = "crate::ids::uuid_u128")]
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

mgmt_rpc!(JoinReq, SysJoin, JoinReply, |req| {
    check_name("address", &req.addr)?;
    check_name("fault domain", &req.fault_domain)?;
    if req.targets == 0 || req.targets > MAX_TARGETS_PER_SERVER {
        return Err(ShoalError::invalid(format!(
            "a server has 1..={MAX_TARGETS_PER_SERVER} targets, not {}",
            req.targets
        )));
    }
    Ok(())
});

/// Most targets one server may have.
pub const MAX_TARGETS_PER_SERVER: u32 = 64;

/// A server's periodic sign of life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReq {
    pub rank: u32,
    #[serde(with = "crate::ids::uuid_u128")]
    pub uuid: u128,
    /// The sender's heartbeat period in milliseconds; the MS waits a few
    /// periods before it calls the sender unresponsive.
    pub period_ms: u32,
    /// How many destroyed containers the sender already knows of.
    pub tombstones_seen: u64,
    /// The sender's wall clock (ns since the Unix epoch) as it sent the
    /// heartbeat (for logs; the server judges its clock from the reply's).
    pub wall_ns: u64,
    /// The sender's progress through its objects, per pool being rebuilt.
    pub rebuild: Vec<RebuildProgress>,
}

/// How rebuild runs in a pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildCtl {
    /// Stopped by an operator (`shoal pool rebuild stop`): no server goes
    /// through its objects until it is started again, and then each one
    /// resumes where it stopped.
    pub paused: bool,
    /// MiB per second each server sends to spares at most; 0: automatic
    /// (rebuild takes at most 30% of a server's time while clients use it,
    /// all of it otherwise).
    pub rate_mib: u32,
    /// Finish the rebuild even though the pool lost more servers than a
    /// container's rd_fac (`shoal pool rebuild accept-loss`): the data no
    /// server kept reads as missing from then on.
    pub accept_loss: bool,
}

/// What a server's rebuild pass is doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RebuildState {
    /// Nothing to rebuild.
    #[default]
    Idle,
    /// Going through objects, none of which needed copying lately.
    Scanning,
    /// Sending what spares need.
    Pulling,
    /// Waiting to keep the pace set (or to leave clients their share).
    Throttled,
    /// Stopped by an operator.
    Paused,
    /// Through every object for the current map version.
    Done,
}

impl std::fmt::Display for RebuildState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RebuildState::Idle => "idle",
            RebuildState::Scanning => "scanning",
            RebuildState::Pulling => "pulling",
            RebuildState::Throttled => "throttled",
            RebuildState::Paused => "paused",
            RebuildState::Done => "done",
        })
    }
}

/// One server's progress through its objects for one pool's rebuild.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildProgress {
    pub pool: PoolId,
    /// The pool map version the pass is for.
    pub version: u32,
    pub state: RebuildState,
    /// Objects (shards held by this server) gone through, and in all.
    pub objects_done: u64,
    pub objects_total: u64,
    /// Bytes sent to spares by this pass.
    pub bytes: u64,
    /// Shards on a draining target that the pass found with nowhere to go
    /// (their class is wider than the servers that would be left).
    #[serde(default)]
    pub stranded: u64,
}

/// A pool's rebuild, summed over its servers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildStatus {
    /// Paused, pulling or throttled if any server is, else scanning; done
    /// once every server in service is through.
    pub state: RebuildState,
    pub version: u32,
    pub objects_done: u64,
    pub objects_total: u64,
    pub bytes: u64,
    /// Servers in service through their objects, and in all.
    pub servers_done: u32,
    pub servers: u32,
    /// Milliseconds since the first report for this version, the rate of
    /// bytes sent, and the seconds left at the rate objects were gone
    /// through.
    pub elapsed_ms: u64,
    pub bytes_per_sec: u64,
    pub eta_secs: Option<u64>,
    pub ctl: RebuildCtl,
    /// Why the rebuild cannot finish even once every server is through,
    /// if it cannot (a loss past a container's rd_fac).
    pub held_back: Option<String>,
}

/// The current pool-map versions, so servers can refuse stale clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    pub pools: Vec<(PoolId, u32)>,
    /// Containers destroyed since the `tombstones_seen`-th (in order of
    /// destruction), at most a page of them.
    pub tombstones: Vec<ContId>,
    /// How many containers have been destroyed in all.
    pub tombstone_count: u64,
    /// Pools in which the sender's targets are DOWN or DOWNOUT: it serves
    /// them nothing (its copies may be stale) until it is reintegrated.
    pub down_in: Vec<PoolId>,
    /// Pools with excluded targets whose shards are being rebuilt.
    pub rebuilding: Vec<PoolId>,
    /// How rebuild runs in pools where it is not the default.
    pub rebuild_ctl: Vec<(PoolId, RebuildCtl)>,
    /// The addresses of the MS replicas now (they change with
    /// `shoal system add-ms`/`remove-ms`).
    pub ms_replicas: Vec<String>,
    /// The MS's wall clock as it answered, in nanoseconds since the Unix
    /// epoch: the server judges its own clock against it, allowing for the
    /// time the heartbeat took.
    pub wall_ns: u64,
}

/// The MS addresses a caller goes round: the replicas the MS named last
/// (`learned`), then those it was given (`configured`) that are not among
/// them, so that a list naming one replica reaches them all, and a replica
/// added later is found without a config change.
///
/// # Examples
///
/// ```
/// use shoal_common::mgmt::ms_addrs;
///
/// let given = vec!["a:1".to_string()];
/// let named = vec!["b:1".to_string(), "a:1".to_string(), "c:1".to_string()];
/// assert_eq!(ms_addrs(&named, &given), ["b:1", "a:1", "c:1"]);
/// assert_eq!(ms_addrs(&[], &given), ["a:1"]);
/// ```
pub fn ms_addrs(learned: &[String], configured: &[String]) -> Vec<String> {
    let mut all: Vec<String> = learned.to_vec();
    for a in configured {
        if !all.contains(a) {
            all.push(a.clone());
        }
    }
    all
}

/// A client introduces itself (or renews its lease): it gets a clock tag
/// that no other client holds while its lease runs, and the management
/// service's clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientHelloReq {
    /// A random id the client keeps for its lifetime.
    pub owner: u128,
    /// The tag it holds and wants to keep, if any.
    pub renew: Option<u16>,
}

/// A client's clock tag, its lease, and the service's clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientHelloReply {
    pub tag: u16,
    /// How long the tag is the client's (milliseconds from the request);
    /// the client renews it well before, and writes nothing once it lapsed.
    pub lease_ms: u64,
    /// The service's hybrid clock.
    pub now: crate::hlc::Epoch,
    /// The service's wall clock (ns since the Unix epoch), so a client can
    /// tell how far its own clock is off.
    pub wall_ns: u64,
    /// The addresses of the MS replicas now.
    pub ms_replicas: Vec<String>,
}

mgmt_rpc!(ClientHelloReq, ClientHello, ClientHelloReply);

/// A client or server saw calls to `rank` fail (unreachable, timed out).
/// Reports from several reporters declare the rank down even while it
/// heartbeats the MS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportReq {
    pub rank: u32,
    /// Who reports (an address or a client id), so that one reporter
    /// counts once.
    pub reporter: String,
    /// The reporter is about to acknowledge a write that this rank missed:
    /// the rank is declared down at once (it must serve nothing stale), and
    /// the reply comes once that is durable.
    pub missed_write: bool,
}

mgmt_rpc!(ReportReq, SysReport, (), |req| { check_name("reporter", &req.reporter) });

/// Excludes a rank from every pool now (an operator's decision).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExcludeReq {
    pub rank: u32,
}

mgmt_rpc!(ExcludeReq, SysExclude, ());

/// A server has rebuilt, for pool map `version`, every shard it was the
/// source of for the pool's excluded targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildDoneReq {
    pub pool: PoolId,
    pub rank: u32,
    pub version: u32,
}

/// What the MS made of a rebuild report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildDoneReply {
    /// The reporting server's drain from the pool finished with this
    /// report: it is out from map `version` on.
    pub drained: bool,
    pub version: u32,
}

mgmt_rpc!(RebuildDoneReq, RebuildDone, RebuildDoneReply);

/// Brings a down or excluded server back into a pool (all pools when
/// `pool` is `None`): its targets turn `UP`, take writes at once, are
/// rebuilt from the others, and serve reads (`UPIN`) once rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReintegrateReq {
    pub pool: Option<Name>,
    pub rank: u32,
}

mgmt_rpc!(ReintegrateReq, Reintegrate, ());

/// Drains a server from a pool (all pools when `pool` is `None`): its
/// targets keep serving while every shard they hold is copied to where it
/// goes (and gets every write there too), then they turn `DOWNOUT`; at no
/// moment does any object have fewer copies than its class keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReq {
    pub pool: Option<Name>,
    pub rank: u32,
}

mgmt_rpc!(DrainReq, Drain, ());

/// Stops or starts a pool's rebuild, or sets its pace (`None`: unchanged).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildCtlReq {
    pub pool: Name,
    pub paused: Option<bool>,
    /// MiB/s per server; 0: automatic.
    pub rate_mib: Option<u32>,
    /// Finish a rebuild past rd_fac (see [`RebuildCtl::accept_loss`]).
    pub accept_loss: Option<bool>,
}

mgmt_rpc!(RebuildCtlReq, RebuildCtl, RebuildCtl);

mgmt_rpc!(HeartbeatReq, SysHeartbeat, HeartbeatReply);

/// Asks for the system membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemQueryReq {}

/// Every member, by rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemQueryReply {
    pub members: Vec<Member>,
    pub ms_rank: Option<u32>,
    /// The management service's replicas, as the leader sees them.
    pub ms_replicas: Vec<MsReplica>,
}

/// One replica of the management service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsReplica {
    /// Its Raft id: its place (from 1) in the list of MS addresses the
    /// system was created with, or 1000 + rank for one added later.
    pub id: u64,
    pub addr: String,
    /// `leader`, `follower` or `learner`.
    pub role: String,
    pub term: u64,
    /// The last log index it is known to hold (`None`: not known yet).
    pub last_log_index: Option<u64>,
}

mgmt_rpc!(SystemQueryReq, SysQuery, SystemQueryReply);

/// A pool: its identity, map and the servers it spans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    pub uuid: PoolId,
    pub label: String,
    pub map: PoolMap,
    /// Address of every rank in the map.
    pub addrs: Vec<(u32, String)>,
    pub containers: u32,
    /// Excluded targets (rank, index) whose shards are not rebuilt on their
    /// spares yet: those spares take writes but serve no reads.
    pub rebuilding: Vec<(u32, u32)>,
    /// While rebuilding: the ranks that have been through their objects
    /// for the current map version (rebuild ends when every rank in service
    /// has).
    pub rebuilt_by: Vec<u32>,
    /// While rebuilding (or paused): progress, rate and time left.
    pub rebuild: Option<RebuildStatus>,
}

impl PoolInfo {
    /// The placement of this pool's map, with unrebuilt spares unreadable.
    pub fn placement(&self) -> crate::placement::Placement {
        crate::placement::Placement::with_rebuilding(&self.map, &self.rebuilding)
    }
}

/// Adds the server `rank` to the management service's replicas (`add`),
/// or removes it from them. The MS leader changes its Raft membership by
/// joint consensus; the reply is the replicas afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsMembersReq {
    pub rank: u32,
    pub add: bool,
}

mgmt_rpc!(MsMembersReq, MsMembers, Vec<MsReplica>);

/// Sent by the MS leader to a server: host the MS replica with Raft id
/// `id` (`host`: a new, empty one that the leader then brings up to date),
/// or stop hosting it (it was removed; a server hosting another id ignores
/// it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsHostReq {
    pub id: u64,
    pub host: bool,
}

mgmt_rpc!(MsHostReq, MsHost, ());

/// Creates a pool over the given ranks (all joined ranks when empty),
/// using `targets_per_server` targets of each (all when 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolCreateReq {
    pub label: String,
    pub ranks: Vec<u32>,
    pub targets_per_server: u32,
}

mgmt_rpc!(PoolCreateReq, PoolCreate, PoolInfo, |req| { check_label("pool", &req.label) });

/// Destroys a pool; refused while it holds containers unless `force`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolDestroyReq {
    pub pool: Name,
    pub force: bool,
}

mgmt_rpc!(PoolDestroyReq, PoolDestroy, (), |req| { check_name("pool", &req.pool) });

/// Adds servers to a pool. Their targets join the map as NEW (not yet
/// used for placement; a later rebalance brings them in) and the map
/// version goes up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolExtendReq {
    pub pool: Name,
    pub ranks: Vec<u32>,
}

mgmt_rpc!(PoolExtendReq, PoolExtend, PoolInfo, |req| {
    check_name("pool", &req.pool)?;
    if req.ranks.is_empty() {
        return Err(ShoalError::invalid("name at least one rank to add"));
    }
    Ok(())
});

/// Lists pools.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolListReq {}

mgmt_rpc!(PoolListReq, PoolList, Vec<PoolInfo>);

/// Looks a pool up by name: its map and addresses (pool connect and query).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolQueryReq {
    pub pool: Name,
}

mgmt_rpc!(PoolQueryReq, PoolQuery, PoolInfo, |req| { check_name("pool", &req.pool) });

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

mgmt_rpc!(ContCreateReq, ContCreate, ContInfo, |req| {
    check_name("pool", &req.pool)?;
    check_label("container", &req.label)
});

/// Destroys a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContDestroyReq {
    pub pool: Name,
    pub cont: Name,
}

mgmt_rpc!(ContDestroyReq, ContDestroy, ContInfo, |req| {
    check_name("pool", &req.pool)?;
    check_name("container", &req.cont)
});

/// Lists the containers of a pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContListReq {
    pub pool: Name,
}

mgmt_rpc!(ContListReq, ContList, Vec<ContInfo>, |req| { check_name("pool", &req.pool) });

/// Looks a container up by name (container open and query).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContQueryReq {
    pub pool: Name,
    pub cont: Name,
}

mgmt_rpc!(ContQueryReq, ContQuery, ContInfo, |req| {
    check_name("pool", &req.pool)?;
    check_name("container", &req.cont)
});

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

mgmt_rpc!(OidAllocReq, OidAlloc, OidAllocReply, |req| {
    if req.count == 0 || req.count > 1 << 20 {
        return Err(ShoalError::invalid("allocate 1..=1048576 OIDs at a time"));
    }
    Ok(())
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_join_claiming_too_many_targets_is_refused() {
        let mut j = JoinReq {
            uuid: 1,
            addr: "127.0.0.1:1".into(),
            fault_domain: "a".into(),
            targets: 1_000_000_000,
            host: "h".into(),
            pid: 1,
        };
        let e = j.validate(&[]).unwrap_err().to_string();
        assert!(e.contains("targets"), "{e}");
        j.targets = MAX_TARGETS_PER_SERVER;
        j.validate(&[]).unwrap();
    }
}
