//! The management service (MS): system membership, pools, containers and
//! OID allocation.
//!
//! One server, or 3 or 5 (`ms = true` in their config, each listed in
//! `ms_addrs`), host a replica. Every change is a [`state::Command`]
//! committed to the Raft log of a majority of replicas ([`raft`]) and
//! applied to the deterministic [`state::MsState`] before its caller hears
//! of it. Only the leader answers; the others say they are not the leader
//! and callers go on to the next address. Reads are linearizable (the
//! leader confirms its leadership first). Heartbeats, reports and rebuild
//! progress are volatile and kept by the leader: a new leader learns them
//! again from the servers' next heartbeats.
//!
//! All methods block; call them from a blocking thread.

pub mod raft;
pub mod state;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_common::error::Entity;
use shoal_common::mgmt::{
    ClientHelloReply, ClientHelloReq, ContCreateReq, ContDestroyReq, ContInfo, ContListReq, ContQueryReq,
    HeartbeatReply, HeartbeatReq, JoinReply, JoinReq, Member, MemberState, MsMembersReq, OidAllocReply, OidAllocReq,
    PoolCreateReq, PoolDestroyReq, PoolExtendReq, PoolInfo, PoolListReq, PoolQueryReq, RebuildCtl, RebuildCtlReq,
    RebuildDoneReq, RebuildProgress, RebuildState, RebuildStatus, ReintegrateReq, ReportReq, SystemQueryReply,
};
use shoal_common::placement::TargetState;
use shoal_common::{ContId, Epoch, PoolId, Result, ShoalError};
use tracing::info;

use crate::store::meta::MetaLog;
use raft::{MsRaft, MsStore, NodeId, Replicas};
pub use state::OpId;
use state::{Command, MsState, Outcome};

/// A member silent for longer than this (or three of its heartbeat
/// periods, if longer) is reported unresponsive.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// A server whose clock is further than this off the MS's (beyond a
/// heartbeat's round trip) refuses writes until its clock is fixed.
pub const SERVER_CLOCK_SKEW: Duration = Duration::from_secs(5);

/// Most destroyed containers one heartbeat reply names.
const TOMBSTONES_PER_HEARTBEAT: usize = 1024;

/// Format 1: postcard of `MsStateV1` and of commands.
const FORMAT_V1: u8 = 1;
/// Format 2: postcard of `MsStateV2` (client tags, tombstones, exclusions)
/// and of commands (format-1 commands decode unchanged).
const FORMAT_V2: u8 = 2;
/// Format 3: postcard of `MsState` (targets' exclusion order, rebuild
/// controls) and of commands (older commands decode unchanged).
const FORMAT_V3: u8 = 3;
/// Format 4: postcard of `MsStateV4` (targets' extension order) and of
/// commands (older commands decode unchanged).
const FORMAT_V4: u8 = 4;
/// Format 5: postcard of `MsState` (outcomes by operation id) and of
/// commands (older commands decode unchanged).
const FORMAT_V5: u8 = 5;

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    let mut out = vec![FORMAT_V5];
    out.extend(postcard::to_stdvec(v).map_err(|e| ShoalError::Internal(format!("encode MS record: {e}")))?);
    Ok(out)
}

fn postcard_of<T: serde::de::DeserializeOwned>(rest: &[u8]) -> Result<T> {
    postcard::from_bytes(rest).map_err(|e| ShoalError::Io(format!("corrupt MS record: {e}")))
}

/// Decodes a stored state of any format this build reads.
fn decode_state(raw: &[u8]) -> Result<MsState> {
    match raw.split_first() {
        Some((&FORMAT_V1, rest)) => Ok(postcard_of::<state::MsStateV1>(rest)?.migrate()),
        Some((&FORMAT_V2, rest)) => Ok(postcard_of::<state::MsStateV2>(rest)?.migrate()),
        Some((&FORMAT_V3, rest)) => Ok(postcard_of::<state::MsStateV3>(rest)?.migrate()),
        Some((&FORMAT_V4, rest)) => Ok(postcard_of::<state::MsStateV4>(rest)?.migrate()),
        Some((&FORMAT_V5, rest)) => postcard_of(rest),
        Some((v, _)) => Err(ShoalError::Io(format!("MS record has unknown format {v}"))),
        None => Err(ShoalError::Io("empty MS record".into())),
    }
}

/// Decodes a stored command of any format this build reads.
#[cfg(test)]
fn decode_command(raw: &[u8]) -> Result<Command> {
    match raw.split_first() {
        Some((&(FORMAT_V1 | FORMAT_V2 | FORMAT_V3 | FORMAT_V4 | FORMAT_V5), rest)) => postcard_of(rest),
        Some((v, _)) => Err(ShoalError::Io(format!("MS record has unknown format {v}"))),
        None => Err(ShoalError::Io("empty MS record".into())),
    }
}

/// What a server recorded of the MS leader's requests to host a replica
/// (`<data_dir>/ms-replica`): it hosts the one with this Raft id, added to
/// a running system; or its replica was removed. Neither: it hosts one if
/// its config says so (`ms = true`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hosting {
    Added(NodeId),
    Removed,
}

const HOSTING_FILE: &str = "ms-replica";

/// What `<data_dir>/ms-replica` says, if it is there.
pub fn hosting(data_dir: &Path) -> Result<Option<Hosting>> {
    let path = data_dir.join(HOSTING_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ShoalError::Io(format!("read {}: {e}", path.display()))),
    };
    let bad = || ShoalError::Io(format!("{} says {text:?}: expected 'added ID' or 'removed'", path.display()));
    match text.split_whitespace().collect::<Vec<_>>()[..] {
        ["added", id] => Ok(Some(Hosting::Added(id.parse().map_err(|_| bad())?))),
        ["removed"] => Ok(Some(Hosting::Removed)),
        _ => Err(bad()),
    }
}

/// The directory of the replica with Raft id `id` added to a running
/// system (those the system was created with use `<data_dir>/ms`).
pub fn added_dir(data_dir: &Path, id: NodeId) -> std::path::PathBuf {
    data_dir.join(format!("ms-{id}"))
}

/// Records durably that this server hosts an added replica, or that its
/// replica was removed.
pub fn set_hosting(data_dir: &Path, h: Hosting) -> Result<()> {
    let io = |what: &str, e: std::io::Error| ShoalError::Io(format!("{what} in {}: {e}", data_dir.display()));
    let text = match h {
        Hosting::Added(id) => format!("added {id}\n"),
        Hosting::Removed => "removed\n".to_string(),
    };
    let tmp = data_dir.join(format!("{HOSTING_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("create ms-replica", e))?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| io("write ms-replica", e))?;
    f.sync_all().map_err(|e| io("sync ms-replica", e))?;
    std::fs::rename(&tmp, data_dir.join(HOSTING_FILE)).map_err(|e| io("rename ms-replica", e))?;
    std::fs::File::open(data_dir).and_then(|d| d.sync_all()).map_err(|e| io("sync the data directory", e))
}

/// Moves a removed replica's directory aside, to
/// `<its name>.removed-<unix seconds>` beside it.
pub fn move_aside(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let to = dir.with_file_name(format!("{name}.removed-{secs}"));
    std::fs::rename(dir, &to).map_err(|e| ShoalError::Io(format!("move {} aside: {e}", dir.display())))
}

/// Waits for `f` from synchronous MS code: on a blocking thread, or on
/// a runtime worker (the metrics endpoint), which it hands its other tasks
/// first.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let h = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| h.block_on(f))
}

/// What a replica that does not lead answers (the request was not run):
/// callers go on to the next MS address (see `shoal_net::call_ms`).
fn not_leader(leader: Option<openraft::BasicNode>) -> ShoalError {
    let hint = match leader {
        Some(n) => format!("; the leader is at {}", n.addr),
        None => "; a leader is being elected".to_string(),
    };
    ShoalError::NotLeader(format!("this management service replica is not the leader{hint}"))
}

/// How long `rank` has been silent as a leader that took over at
/// `started` counts it (never longer than it has led), and its heartbeat
/// period (zero if not heard from).
fn silence(hb: &HashMap<u32, (Instant, Duration)>, rank: u32, started: Instant) -> (Duration, Duration) {
    let led = started.elapsed();
    hb.get(&rank).map_or((led, Duration::ZERO), |(t, p)| (t.elapsed().min(led), *p))
}

fn random_u128() -> u128 {
    rand::random()
}

/// The management service.
pub struct Ms {
    /// The state machine (applied by Raft), to read.
    state: Arc<Mutex<MsState>>,
    raft: MsRaft,
    /// To ask servers to host a replica, or to stop.
    transport: Arc<shoal_net::tcp::TcpTransport>,
    /// Its directory.
    dir: std::path::PathBuf,
    /// Held while the replicas are being changed: one change at a time (a
    /// caller's retry waits for its first try, then finds it done).
    changing: Mutex<()>,
    me: NodeId,
    /// The term in which this replica last became leader, once it has
    /// started acting as one (see [`Ms::lead`]).
    led: Mutex<Option<u64>>,
    /// Per rank: when it was last heard from, and its heartbeat period.
    heartbeats: Mutex<HashMap<u32, (Instant, Duration)>>,
    /// When this replica started leading: a rank not heard from since
    /// counts as silent from then.
    started: Mutex<Instant>,
    /// Per rank: who reported failed calls to it, and when.
    reports: Mutex<HashMap<u32, Vec<(String, Instant)>>>,
    /// Per rank: how many destroyed containers it has dropped, as it said
    /// in its last heartbeat.
    dropped: Mutex<HashMap<u32, u64>>,
    /// Per pool and rank: its last rebuild progress report.
    progress: Mutex<HashMap<(PoolId, u32), RebuildProgress>>,
    /// Per pool: the map version rebuild last reported on, and since when.
    rebuild_since: Mutex<HashMap<PoolId, (u32, Instant)>>,
}

/// How long each step of adding or removing an MS replica may take.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(8);

/// How long a change may wait to be committed by a majority of the
/// replicas before its caller is told it failed.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a destroy waits for the servers in service to drop the
/// container before it answers anyway.
const DROP_WAIT: Duration = Duration::from_secs(10);

/// When a silent server is declared down and when a down one is excluded.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    pub down_after: Duration,
    pub exclude_after: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness { down_after: Duration::from_secs(5), exclude_after: Duration::from_secs(30) }
    }
}

/// Watches members until `stop`: declares silent ones down and excludes
/// those down past the grace time (see [`Ms::check_liveness`]).
/// `hosted` gives the replica this server hosts now, if any (one may be
/// added or removed while it runs).
pub async fn monitor(hosted: impl Fn() -> Option<Arc<Ms>>, l: Liveness, stop: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let Some(ms) = hosted() else { continue };
        match tokio::task::spawn_blocking(move || ms.check_liveness(l)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("liveness check failed: {e}"),
            Err(e) => tracing::warn!("liveness task: {e}"),
        }
    }
}

/// Distinct reporters whose reports of failed calls to one server, within
/// [`REPORT_WINDOW`], declare it down even while it heartbeats (it is
/// reachable from the MS but not from its peers).
pub const REPORTS_FOR_DOWN: usize = 2;
/// How long a report of failed calls counts.
pub const REPORT_WINDOW: Duration = Duration::from_secs(10);

impl Ms {
    /// Opens the MS replica in `dir` and starts its Raft node among
    /// `replicas`. On a fresh system the replica with the lowest id
    /// initializes the group.
    pub async fn open(dir: &Path, replicas: Replicas) -> Result<Ms> {
        let path = dir.to_path_buf();
        let alone = replicas.members.len() == 1;
        let want = replicas.me;
        let store = tokio::task::spawn_blocking(move || MsStore::open(Arc::new(MetaLog::open(&path)?), alone, want))
            .await
            .map_err(|e| ShoalError::Internal(format!("open MS task: {e}")))??;
        let me = store.me;
        if me != want {
            info!(id = me, listed = want, "this MS replica keeps the Raft id its directory was made for");
        }
        let founding = replicas.founding || store.legacy;
        let state = store.state();
        {
            let s = state.lock().expect("MS lock");
            info!(members = s.members.len(), pools = s.pools.len(), applied = s.applied, "MS state loaded");
        }
        let config =
            Arc::new(raft::config().validate().map_err(|e| ShoalError::Internal(format!("Raft config: {e}")))?);
        let (log_store, sm) = openraft::storage::Adaptor::new(store);
        let transport = Arc::new(shoal_net::tcp::TcpTransport::default());
        let network = raft::MsNetwork::new(transport.clone());
        let raft = MsRaft::new(me, config, network, log_store, sm)
            .await
            .map_err(|e| ShoalError::Internal(format!("start the MS Raft node: {e}")))?;
        let first = replicas.members.keys().next().copied();
        if founding && first == Some(me) && !raft.is_initialized().await.unwrap_or(true) {
            match raft.initialize(replicas.members.clone()).await {
                Ok(()) => info!(replicas = replicas.members.len(), "MS replica group initialized"),
                Err(e) => tracing::warn!("initialize the MS replica group: {e}"),
            }
        }
        Ok(Ms {
            state,
            raft,
            transport,
            dir: dir.to_path_buf(),
            changing: Mutex::new(()),
            me,
            led: Mutex::new(None),
            heartbeats: Mutex::new(HashMap::new()),
            started: Mutex::new(Instant::now()),
            reports: Mutex::new(HashMap::new()),
            dropped: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
            rebuild_since: Mutex::new(HashMap::new()),
        })
    }

    /// Makes one change under its caller's operation id `op` (0: none; see
    /// [`Command::Once`]): if a try of it was applied already (the caller
    /// lost the answer to a leader change and asks again), returns what
    /// that gave; else `make` builds the command from the current state
    /// (names resolved, preconditions checked) and it is committed.
    fn change(&self, op: OpId, make: impl FnOnce(&MsState) -> Result<Command>) -> Result<Outcome> {
        let made = self.read(|s| match s.ops.get(op) {
            Some(out) if op != 0 => Ok(Err(out.clone())),
            _ => make(s).map(Ok),
        })?;
        match made {
            Ok(cmd) => {
                let out = self.propose(op, cmd)?;
                // Tests: this replica dies once it has committed the
                // create of the pool or container the failpoint names,
                // before its caller hears of it.
                #[cfg(feature = "failpoints")]
                if let Some(Some(doomed)) = fail::eval("ms::committed", |label| label) {
                    if matches!(&out, Outcome::Pool(p) if p.label == doomed)
                        || matches!(&out, Outcome::Cont(c) if c.label == doomed)
                    {
                        std::process::abort();
                    }
                }
                Ok(out)
            }
            Err(done) => Ok(done),
        }
    }

    /// Commits a command to a majority of the replicas and applies it
    /// before returning its outcome; under operation id `op` (if not 0)
    /// it is applied once, however often it is proposed.
    fn propose(&self, op: OpId, cmd: Command) -> Result<Outcome> {
        use openraft::error::{ClientWriteError, RaftError};
        let cmd = match op {
            0 => cmd,
            op => Command::Once { op, cmd: Box::new(cmd) },
        };
        let write = tokio::time::timeout(COMMIT_TIMEOUT, self.raft.client_write(cmd));
        let Ok(written) = block_on(write) else {
            return Err(ShoalError::Timeout(format!(
                "the management service could not commit within {COMMIT_TIMEOUT:?}; a majority of its replicas may be down"
            )));
        };
        match written {
            Ok(r) => r.data.0.map_err(ShoalError::from_wire),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(not_leader(f.leader_node)),
            Err(e) => Err(ShoalError::Unreachable(format!("the management service could not commit: {e}"))),
        }
    }

    /// Reads the state once this replica has confirmed it is the leader
    /// (so the read sees every committed change).
    fn read<T>(&self, f: impl FnOnce(&MsState) -> Result<T>) -> Result<T> {
        use openraft::error::{CheckIsLeaderError, RaftError};
        match block_on(self.raft.ensure_linearizable()) {
            Ok(_) => f(&self.state.lock().expect("MS lock")),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Err(not_leader(f.leader_node)),
            Err(e) => Err(ShoalError::Unreachable(format!("the management service cannot confirm its leader: {e}"))),
        }
    }

    /// Whether this replica leads. On the first call of a new term as
    /// leader it counts silence from now (a server heard from before is
    /// never silent for longer than this replica has led) and forgets
    /// reports of failed calls.
    fn lead(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        let mut led = self.led.lock().expect("lock");
        // A replica restarted after its removal still holds the vote it led
        // with, but is a learner.
        if m.current_leader != Some(self.me) || m.state != openraft::ServerState::Leader {
            *led = None;
            return false;
        }
        if *led != Some(m.current_term) {
            *led = Some(m.current_term);
            *self.started.lock().expect("lock") = Instant::now();
            self.reports.lock().expect("lock").clear();
            info!(term = m.current_term, "this MS replica leads");
        }
        true
    }

    /// Answers a Raft message from another replica.
    pub async fn raft_message(&self, req: shoal_common::msg::RaftReq) -> Result<Vec<u8>> {
        raft::serve(&self.raft, req).await
    }

    /// The replicas: id, address, role, term and last log index, as this
    /// replica sees them.
    pub fn replicas(&self) -> Vec<shoal_common::mgmt::MsReplica> {
        let m = self.raft.metrics().borrow().clone();
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        m.membership_config
            .membership()
            .nodes()
            .map(|(id, node)| {
                let role = if m.current_leader == Some(*id) {
                    "leader"
                } else if voters.contains(id) {
                    "follower"
                } else {
                    "learner"
                };
                let index = if *id == self.me {
                    m.last_log_index
                } else {
                    m.replication.as_ref().and_then(|r| r.get(id).cloned().flatten()).map(|l| l.index)
                };
                shoal_common::mgmt::MsReplica {
                    id: *id,
                    addr: node.addr.clone(),
                    role: role.into(),
                    term: m.current_term,
                    last_log_index: index,
                }
            })
            .collect()
    }

    /// This replica's Raft id.
    pub fn id(&self) -> NodeId {
        self.me
    }

    /// Adds the server `rank` to the replicas, or removes it, by joint
    /// consensus (see [`MsMembersReq`]). Adding asks the server to host a
    /// new replica (a fresh Raft id), brings it up to date as a learner,
    /// then makes it a voter; removing takes it out of the voters and the
    /// nodes and tells the server to stop it. One change at a time; both
    /// are idempotent and finish what an earlier try left half done (a
    /// learner not yet voting, a joint configuration): a retry, or adding a
    /// replica that is one already, answers with the replicas as they are.
    /// Returns the replicas, and whether this replica was the one removed
    /// (its server stops it before answering).
    pub fn ms_members(&self, req: MsMembersReq) -> Result<(Vec<shoal_common::mgmt::MsReplica>, bool)> {
        use openraft::ChangeMembers;
        use std::collections::BTreeSet;
        let _one = self.changing.lock().expect("lock");
        let addr = self.read(|s| match s.members.get(&req.rank) {
            Some(m) => Ok(m.join.addr.clone()),
            None => Err(ShoalError::not_found(Entity::Server, format!("rank {}", req.rank))),
        })?;
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let joint = membership.get_joint_config();
        let settled = joint.len() == 1;
        let last: BTreeSet<NodeId> = joint.last().cloned().unwrap_or_default();
        let voting = |id: NodeId| joint.iter().any(|c| c.contains(&id));
        let here = membership.nodes().find(|(_, n)| n.addr == addr).map(|(id, _)| *id);
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            ShoalError::Unreachable(format!("{what} rank {} ({addr}): {e}", req.rank))
        };
        let host = |id: NodeId, host: bool| {
            let r = shoal_common::mgmt::MsHostReq { id, host };
            block_on(shoal_net::call(&*self.transport, &addr, &r, vec![], 0, 0, MEMBERSHIP_TIMEOUT)).map(|_| ())
        };
        let mut removed_me = false;
        if req.add {
            let id = here.unwrap_or_else(raft::new_id);
            if settled && last.contains(&id) {
                return Ok((self.replicas(), false));
            }
            if !voting(id) {
                host(id, true)?;
                info!(rank = req.rank, id, %addr, "adding an MS replica: it catches up as a learner");
                let learner = tokio::time::timeout(
                    MEMBERSHIP_TIMEOUT,
                    self.raft.add_learner(id, openraft::BasicNode::new(&addr), true),
                );
                match block_on(learner) {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(failed("could not bring up to date the new MS replica on", &e)),
                    Err(_) => return Err(failed("timed out bringing up to date the new MS replica on", &"")),
                }
            }
            self.change_members(ChangeMembers::AddVoterIds(BTreeSet::from([id])))?;
            info!(rank = req.rank, id, "MS replica added");
        } else {
            let Some(id) = here else {
                return Ok((self.replicas(), false));
            };
            if voting(id) {
                if last.len() == 1 && last.contains(&id) {
                    return Err(ShoalError::invalid("the last MS replica cannot be removed"));
                }
                // Its node goes with it (not kept as a learner).
                self.change_members(ChangeMembers::RemoveVoters(BTreeSet::from([id])))?;
            } else {
                // A learner an unfinished add left behind.
                self.change_members(ChangeMembers::RemoveNodes(BTreeSet::from([id])))?;
            }
            info!(rank = req.rank, id, "MS replica removed");
            if id == self.me {
                removed_me = true;
            } else if let Err(e) = host(id, false) {
                // The server keeps a replica that no longer votes and that
                // no leader sends to; removing it again tells it again.
                tracing::warn!(rank = req.rank, "the removed MS replica's server did not stop it: {e}");
            }
        }
        Ok((self.replicas(), removed_me))
    }

    /// Changes the replicas by joint consensus (the old and the new set
    /// of voters both agree on the change).
    fn change_members(&self, change: openraft::ChangeMembers<NodeId, openraft::BasicNode>) -> Result<()> {
        use openraft::error::{ClientWriteError, RaftError};
        let change = tokio::time::timeout(MEMBERSHIP_TIMEOUT, self.raft.change_membership(change, false));
        match block_on(change) {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => Err(not_leader(f.leader_node)),
            Ok(Err(e)) => Err(ShoalError::invalid(format!("the MS replicas could not be changed: {e}"))),
            Err(_) => Err(ShoalError::Timeout(format!(
                "the MS replicas were not changed within {MEMBERSHIP_TIMEOUT:?}; a majority of the old or the new \
                 replicas may be down"
            ))),
        }
    }

    /// This replica's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Waits until some replica leads (this one or another).
    pub async fn wait_leader(&self, timeout: Duration) -> Result<()> {
        self.raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .map(|_| ())
            .map_err(|e| ShoalError::Timeout(format!("no MS leader: {e}")))
    }

    /// Stops the Raft node.
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }

    pub fn join(&self, req: JoinReq, op: OpId) -> Result<JoinReply> {
        let addr = req.addr.clone();
        match self.change(op, |_| Ok(Command::Join(req)))? {
            Outcome::Rank(rank) => {
                self.heartbeats.lock().expect("lock").insert(rank, (Instant::now(), Duration::ZERO));
                info!(rank, %addr, "server joined");
                Ok(JoinReply { rank })
            }
            o => Err(ShoalError::Internal(format!("join produced {o:?}"))),
        }
    }

    pub fn heartbeat(&self, req: HeartbeatReq) -> Result<HeartbeatReply> {
        self.lead();
        self.read(|s| match s.members.get(&req.rank) {
            Some(m) if m.join.uuid == req.uuid => Ok(()),
            _ => Err(ShoalError::not_found(Entity::Server, format!("rank {} is not a member; join first", req.rank))),
        })?;
        let period = Duration::from_millis(req.period_ms as u64);
        self.heartbeats.lock().expect("lock").insert(req.rank, (Instant::now(), period));
        self.dropped.lock().expect("lock").insert(req.rank, req.tombstones_seen);
        {
            let mut progress = self.progress.lock().expect("lock");
            progress.retain(|(_, r), _| *r != req.rank);
            let mut since = self.rebuild_since.lock().expect("lock");
            for p in &req.rebuild {
                progress.insert((p.pool, req.rank), *p);
                let s = since.entry(p.pool).or_insert((p.version, Instant::now()));
                if s.0 != p.version {
                    *s = (p.version, Instant::now());
                }
            }
        }
        // The server judges its clock itself from the reply's `wall_ns`
        // (a heartbeat that waited in queues or retries would otherwise
        // look like a clock behind).
        self.read(|s| {
            let seen = (req.tombstones_seen as usize).min(s.tombstones.len());
            Ok(HeartbeatReply {
                pools: s.pools.values().map(|p| (p.uuid, p.map.version)).collect(),
                tombstones: s.tombstones[seen..].iter().take(TOMBSTONES_PER_HEARTBEAT).copied().collect(),
                tombstone_count: s.tombstones.len() as u64,
                rebuilding: s.rebuilding.keys().copied().collect(),
                rebuild_ctl: s.rebuild_ctl.iter().map(|(p, c)| (*p, *c)).collect(),
                down_in: s
                    .pools
                    .values()
                    .filter(|p| {
                        p.map
                            .targets
                            .iter()
                            .any(|t| t.rank == req.rank && matches!(t.state, TargetState::Down | TargetState::DownOut))
                    })
                    .map(|p| p.uuid)
                    .collect(),
                ms_replicas: self.replica_addrs(),
                wall_ns: shoal_common::hlc::wall_ns(),
            })
        })
    }

    /// The replicas' addresses, voters first.
    fn replica_addrs(&self) -> Vec<String> {
        let mut r = self.replicas();
        r.sort_by_key(|x| x.role == "learner");
        r.into_iter().map(|x| x.addr).collect()
    }

    /// Gives a client its clock tag.
    pub fn client_hello(&self, req: ClientHelloReq, now: Epoch, op: OpId) -> Result<ClientHelloReply> {
        let wall_ns = shoal_common::hlc::wall_ns();
        let cmd = Command::ClientHello { owner: req.owner, renew: req.renew, now_ms: wall_ns / 1_000_000 };
        match self.change(op, |_| Ok(cmd))? {
            Outcome::ClientTag(tag) => Ok(ClientHelloReply {
                tag,
                lease_ms: state::TAG_LEASE_MS,
                now,
                wall_ns,
                ms_replicas: self.replica_addrs(),
            }),
            o => Err(ShoalError::Internal(format!("client hello produced {o:?}"))),
        }
    }

    /// Declares silent servers down and excludes those down for longer than
    /// the grace time. Returns the ranks it changed. Call it periodically.
    pub fn check_liveness(&self, l: Liveness) -> Result<Vec<u32>> {
        if !self.lead() {
            return Ok(Vec::new());
        }
        let started = *self.started.lock().expect("lock");
        let now_ms = shoal_common::hlc::wall_ns() / 1_000_000;
        let hb = self.heartbeats.lock().expect("lock").clone();
        let reports = {
            let mut r = self.reports.lock().expect("lock");
            r.values_mut().for_each(|v| v.retain(|(_, t)| t.elapsed() < REPORT_WINDOW));
            r.retain(|_, v| !v.is_empty());
            r.clone()
        };
        let (to_down, to_out) = self.read(|s| {
            let mut down = Vec::new();
            let mut out = Vec::new();
            for rank in s.members.keys() {
                if s.excluded.contains(rank) {
                    continue;
                }
                if let Some(since) = s.down.get(rank) {
                    if now_ms.saturating_sub(*since) >= l.exclude_after.as_millis() as u64 {
                        out.push(*rank);
                    }
                    continue;
                }
                let (silent, period) = silence(&hb, *rank, started);
                let mut who: Vec<&String> =
                    reports.get(rank).map(|v| v.iter().map(|(w, _)| w).collect()).unwrap_or_default();
                who.sort();
                who.dedup();
                if silent > l.down_after.max(period * 3) || who.len() >= REPORTS_FOR_DOWN {
                    down.push(*rank);
                }
            }
            Ok((down, out))
        })?;
        for &rank in &to_down {
            info!(rank, "server declared down");
            self.propose(0, Command::MarkDown { rank, now_ms })?;
        }
        for &rank in &to_out {
            info!(rank, "server excluded");
            self.propose(0, Command::Exclude { rank })?;
        }
        Ok(to_down.into_iter().chain(to_out).collect())
    }

    /// Records that `reporter` saw calls to a rank fail.
    pub fn report(&self, req: ReportReq, op: OpId) -> Result<()> {
        self.read(|s| match s.members.get(&req.rank) {
            Some(_) => Ok(()),
            None => Err(ShoalError::not_found(Entity::Server, format!("rank {}", req.rank))),
        })?;
        if req.missed_write {
            let now_ms = shoal_common::hlc::wall_ns() / 1_000_000;
            info!(rank = req.rank, reporter = %req.reporter, "server declared down: it missed a write");
            self.change(op, |_| Ok(Command::MarkDown { rank: req.rank, now_ms }))?;
            return Ok(());
        }
        self.reports.lock().expect("lock").entry(req.rank).or_default().push((req.reporter, Instant::now()));
        Ok(())
    }

    /// Starts draining a rank from a pool (or all): see [`Command::Drain`].
    pub fn drain(&self, req: shoal_common::mgmt::DrainReq, op: OpId) -> Result<()> {
        self.change(op, |s| {
            let pool = req.pool.as_ref().map(|name| s.find_pool(name)).transpose()?;
            Ok(Command::Drain { pool, rank: req.rank })
        })?;
        info!(rank = req.rank, "server draining");
        Ok(())
    }

    /// Brings a rank back into a pool (or all): see [`Command::Reintegrate`].
    pub fn reintegrate(&self, req: ReintegrateReq, op: OpId) -> Result<()> {
        // The checks run for a first try only: a retry of one that was
        // applied is answered as it was (a new leader may not have heard
        // from the rank yet).
        self.change(op, |s| {
            let heard = self.heartbeats.lock().expect("lock").get(&req.rank).copied();
            let limit = heard.map_or(HEARTBEAT_TIMEOUT, |(_, p)| HEARTBEAT_TIMEOUT.max(p * 3));
            match heard.map(|(t, _)| t.elapsed()) {
                Some(silent) if silent <= limit => {}
                _ if !s.members.contains_key(&req.rank) => {
                    return Err(ShoalError::not_found(Entity::Server, format!("rank {}", req.rank)))
                }
                silent => {
                    let since = silent.map_or("since this MS started".to_string(), |d| format!("for {d:.0?}"));
                    return Err(ShoalError::invalid(format!(
                        "rank {} has not been heard from {since}: start it, then reintegrate it",
                        req.rank
                    )));
                }
            }
            let pool = req.pool.as_ref().map(|name| s.find_pool(name)).transpose()?;
            // Old reports of failed calls must not mark it down again.
            self.reports.lock().expect("lock").remove(&req.rank);
            Ok(Command::Reintegrate { pool, rank: req.rank })
        })?;
        info!(rank = req.rank, "server reintegrated");
        Ok(())
    }

    /// Records that a rank rebuilt what it was the source of.
    pub fn rebuild_done(&self, req: RebuildDoneReq, op: OpId) -> Result<shoal_common::mgmt::RebuildDoneReply> {
        let cmd = Command::RebuildDone { pool: req.pool, rank: req.rank, version: req.version };
        let drained = match self.change(op, |_| Ok(cmd))? {
            Outcome::Drained(d) => d,
            o => return Err(ShoalError::Internal(format!("rebuild done produced {o:?}"))),
        };
        let version = self.read(|s| Ok(s.pool(req.pool)?.map.version))?;
        Ok(shoal_common::mgmt::RebuildDoneReply { drained, version })
    }

    /// Sets the MS's gauges: members per state, and per pool its targets
    /// per state and those being rebuilt.
    pub fn fill_metrics(&self, m: &crate::metrics::Metrics) {
        use crate::metrics::{Pool, PoolState, State};
        m.ms_members.clear();
        if let Ok(q) = self.system_query(None) {
            for st in [MemberState::Joined, MemberState::Unresponsive, MemberState::Down, MemberState::Excluded] {
                let n = q.members.iter().filter(|x| x.state == st).count();
                m.ms_members.get_or_create(&State { state: format!("{st:?}").to_lowercase() }).set(n as i64);
            }
        }
        m.ms_targets.clear();
        m.ms_rebuilding.clear();
        let _ = self.read(|s| {
            for p in s.pools.values() {
                let states =
                    [TargetState::Up, TargetState::UpIn, TargetState::Down, TargetState::DownOut, TargetState::New];
                for st in states {
                    let n = p.map.targets.iter().filter(|t| t.state == st).count();
                    let l = PoolState { pool: p.label.clone(), state: st.to_string() };
                    m.ms_targets.get_or_create(&l).set(n as i64);
                }
                let n = s.rebuilding.get(&p.uuid).map_or(0, Vec::len);
                m.ms_rebuilding.get_or_create(&Pool { pool: p.label.clone() }).set(n as i64);
            }
            Ok(())
        });
    }

    /// Excludes a rank now (an operator's decision). Its two steps are
    /// operations `op` and `op + 1`.
    pub fn exclude(&self, rank: u32, op: OpId) -> Result<()> {
        let now_ms = shoal_common::hlc::wall_ns() / 1_000_000;
        self.change(op, |_| Ok(Command::MarkDown { rank, now_ms }))?;
        let second = if op == 0 { 0 } else { op.wrapping_add(1) };
        self.change(second, |_| Ok(Command::Exclude { rank })).map(|_| ())
    }

    pub fn system_query(&self, ms_rank: Option<u32>) -> Result<SystemQueryReply> {
        let hb = self.heartbeats.lock().expect("lock").clone();
        self.read(|s| {
            let members = s
                .members
                .values()
                .map(|m| {
                    let silent = hb.get(&m.rank).map(|(t, _)| t.elapsed());
                    let limit = hb.get(&m.rank).map_or(HEARTBEAT_TIMEOUT, |(_, p)| HEARTBEAT_TIMEOUT.max(*p * 3));
                    let state = if s.excluded.contains(&m.rank) {
                        MemberState::Excluded
                    } else if s.down.contains_key(&m.rank) {
                        MemberState::Down
                    } else {
                        match silent {
                            Some(d) if d <= limit => MemberState::Joined,
                            _ => MemberState::Unresponsive,
                        }
                    };
                    Member {
                        rank: m.rank,
                        uuid: m.join.uuid,
                        addr: m.join.addr.clone(),
                        fault_domain: m.join.fault_domain.clone(),
                        targets: m.join.targets,
                        host: m.join.host.clone(),
                        pid: m.join.pid,
                        state,
                        silent_ms: silent.map(|d| d.as_millis() as u64),
                    }
                })
                .collect();
            Ok(SystemQueryReply { members, ms_rank, ms_replicas: self.replicas() })
        })
    }

    pub fn pool_create(&self, req: PoolCreateReq, op: OpId) -> Result<PoolInfo> {
        let cmd = Command::PoolCreate {
            uuid: PoolId(random_u128()),
            label: req.label,
            ranks: req.ranks,
            targets_per_server: req.targets_per_server,
        };
        match self.change(op, |_| Ok(cmd))? {
            Outcome::Pool(p) => Ok(p),
            o => Err(ShoalError::Internal(format!("pool create produced {o:?}"))),
        }
    }

    pub fn pool_destroy(&self, req: PoolDestroyReq, op: OpId) -> Result<()> {
        self.change(op, |s| Ok(Command::PoolDestroy { pool: s.find_pool(&req.pool)?, force: req.force }))?;
        self.wait_dropped();
        Ok(())
    }

    /// Blocks until every server in service (heard from recently, neither
    /// down nor excluded) has dropped every container destroyed so far, so
    /// that old handles' next calls fail; at most [`DROP_WAIT`]. A server
    /// that is down meanwhile catches up before it serves again.
    fn wait_dropped(&self) {
        let deadline = Instant::now() + DROP_WAIT;
        self.lead();
        // Early in a leadership every member counts as in service until it
        // has had time to heartbeat here; silence counts from its start.
        let started = *self.started.lock().expect("lock");
        loop {
            let hb = self.heartbeats.lock().expect("lock").clone();
            let dropped = self.dropped.lock().expect("lock").clone();
            let behind: Vec<u32> = self
                .read(|s| {
                    let count = s.tombstones.len() as u64;
                    Ok(s.members
                        .keys()
                        .copied()
                        .filter(|r| !s.excluded.contains(r) && !s.down.contains_key(r))
                        .filter(|r| {
                            let (silent, period) = silence(&hb, *r, started);
                            silent <= HEARTBEAT_TIMEOUT.max(period * 3)
                        })
                        .filter(|r| dropped.get(r).copied().unwrap_or(0) < count)
                        .collect())
                })
                .unwrap_or_default();
            if behind.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(?behind, "servers have not dropped destroyed containers yet; answering anyway");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pool_extend(&self, req: PoolExtendReq, op: OpId) -> Result<PoolInfo> {
        match self.change(op, |s| Ok(Command::PoolExtend { pool: s.find_pool(&req.pool)?, ranks: req.ranks }))? {
            Outcome::Pool(p) => Ok(p),
            o => Err(ShoalError::Internal(format!("pool extend produced {o:?}"))),
        }
    }

    pub fn pool_list(&self, _req: PoolListReq) -> Result<Vec<PoolInfo>> {
        let pools: Vec<PoolInfo> = self.read(|s| s.pools.keys().map(|p| s.pool_info(*p)).collect())?;
        Ok(pools.into_iter().map(|p| self.with_rebuild(p)).collect())
    }

    pub fn pool_query(&self, req: PoolQueryReq) -> Result<PoolInfo> {
        let p = self.read(|s| s.pool_info(s.find_pool(&req.pool)?))?;
        Ok(self.with_rebuild(p))
    }

    /// Fills in the rebuild status of a pool being rebuilt (or paused)
    /// from its servers' reports.
    fn with_rebuild(&self, mut p: PoolInfo) -> PoolInfo {
        let (ctl, held_back) = self
            .read(|s| Ok((s.rebuild_ctl.get(&p.uuid).copied().unwrap_or_default(), s.rebuild_held_back(p.uuid))))
            .unwrap_or_default();
        if p.rebuilding.is_empty() {
            return p;
        }
        let serving: std::collections::BTreeSet<u32> =
            p.map.targets.iter().filter(|t| t.state.is_available()).map(|t| t.rank).collect();
        let progress = self.progress.lock().expect("lock");
        let mine: Vec<&RebuildProgress> =
            serving.iter().filter_map(|r| progress.get(&(p.uuid, *r))).filter(|x| x.version == p.map.version).collect();
        let done = serving.iter().filter(|r| p.rebuilt_by.contains(r)).count() as u32;
        let any = |st: RebuildState| mine.iter().any(|x| x.state == st);
        // Stopped once no server is sending any more.
        let state = if ctl.paused && !any(RebuildState::Pulling) && !any(RebuildState::Throttled) {
            RebuildState::Paused
        } else if any(RebuildState::Pulling) {
            RebuildState::Pulling
        } else if any(RebuildState::Throttled) {
            RebuildState::Throttled
        } else {
            RebuildState::Scanning
        };
        let (objects_done, objects_total, bytes) =
            mine.iter().fold((0, 0, 0), |(d, t, b), x| (d + x.objects_done, t + x.objects_total, b + x.bytes));
        let stranded: u64 = mine.iter().map(|x| x.stranded).sum();
        let draining: std::collections::BTreeSet<u32> =
            p.map.targets.iter().filter(|t| t.state == TargetState::Drain).map(|t| t.rank).collect();
        let held_back = held_back.or_else(|| {
            (stranded > 0).then(|| {
                format!(
                    "{stranded} shards on draining rank(s) {draining:?} have nowhere to go: their class is wider than \
                     the servers that would be left; `shoal pool reintegrate {} RANK` cancels the drain (then extend \
                     the pool and drain again)",
                    p.label
                )
            })
        });
        let elapsed = self
            .rebuild_since
            .lock()
            .expect("lock")
            .get(&p.uuid)
            .filter(|(v, _)| *v == p.map.version)
            .map_or(Duration::ZERO, |(_, t)| t.elapsed());
        let secs = elapsed.as_secs_f64().max(0.001);
        let eta_secs = (objects_done > 0 && objects_total >= objects_done)
            .then(|| ((objects_total - objects_done) as f64 * secs / objects_done as f64).ceil() as u64);
        p.rebuild = Some(RebuildStatus {
            state,
            version: p.map.version,
            objects_done,
            objects_total,
            bytes,
            servers_done: done,
            servers: serving.len() as u32,
            elapsed_ms: elapsed.as_millis() as u64,
            bytes_per_sec: (bytes as f64 / secs) as u64,
            eta_secs,
            ctl,
            held_back,
        });
        p
    }

    /// Stops or starts a pool's rebuild, or sets its pace.
    pub fn rebuild_ctl(&self, req: RebuildCtlReq, op: OpId) -> Result<RebuildCtl> {
        if req.rate_mib.is_some_and(|r| r > 1 << 20) {
            return Err(ShoalError::invalid("a rebuild rate is at most 1048576 MiB/s (0: automatic)"));
        }
        let cmd = |s: &MsState| {
            let pool = s.find_pool(&req.pool)?;
            Ok(Command::SetRebuild { pool, paused: req.paused, rate_mib: req.rate_mib, accept_loss: req.accept_loss })
        };
        match self.change(op, cmd)? {
            Outcome::RebuildCtl(c) => {
                info!(pool = %req.pool, paused = c.paused, rate_mib = c.rate_mib, "rebuild control changed");
                Ok(c)
            }
            o => Err(ShoalError::Internal(format!("rebuild control produced {o:?}"))),
        }
    }

    pub fn cont_create(&self, req: ContCreateReq, op: OpId) -> Result<ContInfo> {
        let cmd = |s: &MsState| {
            let pool = s.find_pool(&req.pool)?;
            Ok(Command::ContCreate { pool, uuid: ContId(random_u128()), label: req.label, props: req.props })
        };
        match self.change(op, cmd)? {
            Outcome::Cont(c) => Ok(c),
            o => Err(ShoalError::Internal(format!("container create produced {o:?}"))),
        }
    }

    pub fn cont_destroy(&self, req: ContDestroyReq, op: OpId) -> Result<ContInfo> {
        let cmd = |s: &MsState| {
            let pool = s.find_pool(&req.pool)?;
            Ok(Command::ContDestroy { pool, cont: s.find_cont(pool, &req.cont)? })
        };
        match self.change(op, cmd)? {
            Outcome::Cont(c) => {
                self.wait_dropped();
                Ok(c)
            }
            o => Err(ShoalError::Internal(format!("container destroy produced {o:?}"))),
        }
    }

    pub fn cont_list(&self, req: ContListReq) -> Result<Vec<ContInfo>> {
        self.read(|s| {
            let p = s.find_pool(&req.pool)?;
            s.pool(p)?.containers.keys().map(|c| s.cont_info(p, *c)).collect()
        })
    }

    pub fn cont_query(&self, req: ContQueryReq) -> Result<ContInfo> {
        self.read(|s| {
            let p = s.find_pool(&req.pool)?;
            s.cont_info(p, s.find_cont(p, &req.cont)?)
        })
    }

    pub fn oid_alloc(&self, req: OidAllocReq, op: OpId) -> Result<OidAllocReply> {
        match self.change(op, |_| Ok(Command::OidAlloc { pool: req.pool, cont: req.cont, count: req.count }))? {
            Outcome::FirstOid(first) => Ok(OidAllocReply { first }),
            o => Err(ShoalError::Internal(format!("OID allocation produced {o:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one() -> Replicas {
        Replicas::from_addrs(&["127.0.0.1:1".to_string()], "127.0.0.1:1").unwrap()
    }

    async fn open(dir: &Path) -> Arc<Ms> {
        // Raft's tasks let go of the previous instance's store a moment
        // after its shutdown.
        let mut tries = 0;
        let ms = loop {
            match Ms::open(dir, one()).await {
                Ok(ms) => break Arc::new(ms),
                Err(e) if tries < 100 => {
                    tries += 1;
                    tracing::debug!("reopen: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        ms.wait_leader(Duration::from_secs(10)).await.unwrap();
        ms
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_keeps_its_raft_id_when_the_address_list_changes() {
        let dir = tempfile::tempdir().unwrap();
        let ms = open(dir.path()).await;
        assert_eq!(ms.id(), 1);
        ms.shutdown().await;
        drop(ms);
        // Its address is now listed second: it is still node 1.
        let addrs = ["127.0.0.1:2".to_string(), "127.0.0.1:1".to_string()];
        let listed = Replicas::from_addrs(&addrs, "127.0.0.1:1").unwrap();
        assert_eq!(listed.me, 2);
        let mut tries = 0;
        let ms = loop {
            match Ms::open(dir.path(), listed.clone()).await {
                Ok(ms) => break ms,
                Err(_) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(ms.id(), 1);
        ms.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_ms_state_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let ms = open(dir.path()).await;
        let m = ms.clone();
        tokio::task::spawn_blocking(move || {
            let ms = m;
            let j = JoinReq {
                uuid: 5,
                addr: "127.0.0.1:1".into(),
                fault_domain: "a".into(),
                targets: 1,
                host: "h".into(),
                pid: 1,
            };
            assert_eq!(ms.join(j, 1).unwrap().rank, 0);
            ms.pool_create(PoolCreateReq { label: "p".into(), ranks: vec![], targets_per_server: 0 }, 2).unwrap();
        })
        .await
        .unwrap();
        ms.shutdown().await;
        drop(ms);
        let ms = open(dir.path()).await;
        tokio::task::spawn_blocking(move || {
            let p = ms.pool_query(PoolQueryReq { pool: "p".into() }).unwrap();
            assert_eq!(p.map.targets.len(), 1);
            let q = ms.system_query(None).unwrap();
            assert_eq!(q.members.len(), 1);
            assert_eq!(q.ms_replicas.len(), 1);
            assert_eq!(q.ms_replicas[0].role, "leader");
        })
        .await
        .unwrap();
    }
}

#[cfg(test)]
mod fixture {
    use super::*;
    use shoal_common::mgmt::ContProps;

    /// A small state as format 1 encodes it. The bytes must keep decoding
    /// for as long as format-1 MS logs can exist on disk.
    const STATE_V1: &str = include_str!("fixtures/state-v1.hex");

    fn sample() -> MsState {
        let mut s = MsState::default();
        let j = JoinReq {
            uuid: 7,
            addr: "127.0.0.1:1".into(),
            fault_domain: "rack1".into(),
            targets: 2,
            host: "h".into(),
            pid: 9,
        };
        s.apply(&Command::Join(j)).unwrap();
        let cmd = Command::PoolCreate { uuid: PoolId(5), label: "tank".into(), ranks: vec![], targets_per_server: 0 };
        s.apply(&cmd).unwrap();
        let props = ContProps { rd_fac: 0, oclass: Some("S1".into()), ..ContProps::default() };
        s.apply(&Command::ContCreate { pool: PoolId(5), uuid: ContId(6), label: "c".into(), props }).unwrap();
        s
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn unhex(h: &str) -> Vec<u8> {
        (0..h.trim().len()).step_by(2).map(|i| u8::from_str_radix(&h.trim()[i..i + 2], 16).unwrap()).collect()
    }

    /// A small state as format 2 encodes it: format 1's sample, a client
    /// tag handed out and a container destroyed.
    const STATE_V2: &str = include_str!("fixtures/state-v2.hex");

    fn sample_v2() -> MsState {
        let mut s = sample();
        s.apply(&Command::ClientHello { owner: 77, renew: None, now_ms: 1000 }).unwrap();
        s.apply(&Command::ContDestroy { pool: PoolId(5), cont: ContId(6) }).unwrap();
        s
    }

    #[test]
    fn format_1_state_decodes_and_migrates() {
        let got = decode_state(&unhex(STATE_V1)).unwrap();
        assert_eq!(got, sample());
        assert_eq!(got.clients, 0);
        // Format-1 commands still decode.
        let cmd = Command::OidAlloc { pool: PoolId(5), cont: ContId(6), count: 3 };
        let mut v1 = vec![FORMAT_V1];
        v1.extend(postcard::to_stdvec(&cmd).unwrap());
        assert_eq!(decode_command(&v1).unwrap(), cmd);
    }

    #[test]
    fn format_2_state_decodes_and_migrates() {
        let want = sample_v2();
        assert_eq!(want.tombstones, vec![ContId(6)]);
        assert_eq!(decode_state(&unhex(STATE_V2)).unwrap(), want);
    }

    /// Format 2's sample with a target excluded and a rebuild paused.
    const STATE_V3: &str = include_str!("fixtures/state-v3.hex");

    fn sample_v3() -> MsState {
        let mut s = sample_v2();
        s.apply(&Command::Exclude { rank: 0 }).unwrap();
        let cmd = Command::SetRebuild { pool: PoolId(5), paused: Some(true), rate_mib: Some(20), accept_loss: None };
        s.apply(&cmd).unwrap();
        s
    }

    #[test]
    fn format_3_state_decodes_and_migrates() {
        let want = sample_v3();
        assert_eq!(want.pools[&PoolId(5)].map.targets[0].out_seq, 1);
        assert_eq!(decode_state(&unhex(STATE_V3)).unwrap(), want);
    }

    /// Format 3's sample with a second server that joined the pool by
    /// `pool extend`.
    const STATE_V4: &str = include_str!("fixtures/state-v4.hex");

    fn sample_v4() -> MsState {
        let mut s = sample_v3();
        let j = JoinReq {
            uuid: 8,
            addr: "127.0.0.1:2".into(),
            fault_domain: "rack2".into(),
            targets: 1,
            host: "h".into(),
            pid: 10,
        };
        s.apply(&Command::Join(j)).unwrap();
        s.apply(&Command::PoolExtend { pool: PoolId(5), ranks: vec![1] }).unwrap();
        let version = s.pools[&PoolId(5)].map.version;
        s.apply(&Command::RebuildDone { pool: PoolId(5), rank: 1, version }).unwrap();
        s
    }

    #[test]
    fn format_4_state_decodes_and_migrates() {
        let want = sample_v4();
        let joined = want.pools[&PoolId(5)].map.targets.iter().find(|t| t.rank == 1).unwrap();
        assert_eq!((joined.state, joined.added), (TargetState::UpIn, 2));
        assert_eq!(decode_state(&unhex(STATE_V4)).unwrap(), want);
    }

    /// Format 4's sample with an OID range handed out under an operation
    /// id.
    const STATE_V5: &str = include_str!("fixtures/state-v5.hex");

    fn sample_v5() -> MsState {
        let mut s = sample_v4();
        let cmd = Command::OidAlloc { pool: PoolId(5), cont: ContId(6), count: 3 };
        s.apply(&Command::Once { op: 77, cmd: Box::new(cmd) }).unwrap_err();
        let cmd = Command::PoolExtend { pool: PoolId(5), ranks: vec![] };
        s.apply(&Command::Once { op: 78, cmd: Box::new(cmd) }).unwrap();
        s
    }

    #[test]
    fn format_5_state_decodes() {
        let want = sample_v5();
        assert!(want.ops.get(78).is_some());
        assert_eq!(hex(&encode(&want).unwrap()), STATE_V5.trim(), "format 5 encoding changed");
        assert_eq!(decode_state(&unhex(STATE_V5)).unwrap(), want);
    }
}
