//! The management service replicated with Raft (openraft).
//!
//! [`MsStore`] is the Raft storage: the log, the vote and the snapshot in
//! the MS's RocksDB ([`MetaLog`], synced before Raft hears of a write), and
//! the deterministic [`MsState`] as the state machine. Applying a command
//! runs [`MsState::apply`] on a copy and keeps the copy only when the
//! command succeeds, as the unreplicated MS did; the outcome (or the
//! refusal) goes back to the proposer. The applied state is written after
//! every batch, so a restart does not replay the whole log; snapshots are
//! that state, and bound the log.
//!
//! [`MsNetwork`] carries Raft's messages between replicas as
//! [`RaftReq`] frames over the ordinary transport.

// openraft's traits fix `StorageError` (large) as the error type.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::storage::{LogState, RaftLogReader, RaftSnapshotBuilder, RaftStorage, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, OptionalSend, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership, Vote,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shoal_common::error::WireError;
use shoal_common::msg::{RaftKind, RaftReq};
use shoal_common::ShoalError;
use shoal_net::tcp::TcpTransport;

use super::state::{Command, MsState, Outcome};
use crate::store::meta::MetaLog;

/// What applying one command gave its proposer: the outcome, or the
/// refusal (a refused command changes nothing, on every replica alike).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Applied(pub std::result::Result<Outcome, WireError>);

openraft::declare_raft_types!(
    /// The MS's Raft types: commands in, outcomes out, ranks of the MS
    /// replicas' list as node ids.
    pub TypeConfig:
        D = Command,
        R = Applied,
);

/// A replica's id: its place (from 1) in the configured list of MS
/// addresses.
pub type NodeId = u64;
/// The MS's Raft instance.
pub type MsRaft = openraft::Raft<TypeConfig>;

type StorageResult<T> = Result<T, StorageError<NodeId>>;

const VOTE: &str = "raft/vote";
const PURGED: &str = "raft/purged";
const APPLIED: &str = "raft/sm";
const SNAPSHOT: &str = "raft/snap";
const REPLICA_ID: &str = "raft/id";

/// Raft's records are JSON: self-describing, so openraft's own serde
/// attributes are honoured whatever they are.
fn to_json<T: Serialize>(v: &T) -> StorageResult<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| StorageIOError::write(&e).into())
}

fn from_json<T: DeserializeOwned>(b: &[u8]) -> StorageResult<T> {
    serde_json::from_slice(b).map_err(|e| StorageIOError::read(&e).into())
}

fn io_err(e: ShoalError) -> StorageError<NodeId> {
    StorageIOError::write(&e).into()
}

/// The applied state as stored: which entry it is as of, the membership,
/// and the MS state in its own versioned encoding.
#[derive(Serialize, Deserialize)]
struct AppliedRecord {
    last: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    state: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct SnapshotRecord {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// The MS's Raft storage and state machine.
pub struct MsStore {
    log: Arc<MetaLog>,
    /// The state machine, shared with the MS that reads it.
    state: Arc<Mutex<MsState>>,
    last: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    /// This replica's Raft id, as recorded when its directory was made.
    pub me: NodeId,
    /// Whether it starts from a state the unreplicated MS wrote.
    pub legacy: bool,
}

impl MsStore {
    /// Opens the storage over `log`. A state written by the unreplicated
    /// MS (before Raft) is taken as the starting state of a one-replica MS
    /// (`alone`); with several replicas it is refused, as the others would
    /// start from nothing and diverge.
    /// The directory keeps the Raft id it was made for (`me` on its first
    /// open): a replica is the same node whatever its place in the MS
    /// address list becomes.
    pub fn open(log: Arc<MetaLog>, alone: bool, me: NodeId) -> shoal_common::Result<MsStore> {
        let me = match log.record(REPLICA_ID)? {
            Some(b) => {
                let raw: [u8; 8] =
                    b.as_slice().try_into().map_err(|_| ShoalError::Io("corrupt MS replica id record".into()))?;
                NodeId::from_le_bytes(raw)
            }
            None => {
                log.put_records(&[(REPLICA_ID, &me.to_le_bytes())])?;
                me
            }
        };
        let mut legacy = false;
        let (state, last, membership) = match log.record(APPLIED)? {
            Some(raw) => {
                let r: AppliedRecord = serde_json::from_slice(&raw)
                    .map_err(|e| ShoalError::Io(format!("corrupt MS state record: {e}")))?;
                (super::decode_state(&r.state)?, r.last, r.membership)
            }
            None => match log.load_state()? {
                Some(_) if !alone => {
                    return Err(ShoalError::invalid(
                        "this MS directory was written before the MS used Raft; start it as the only MS replica \
                         (adding replicas to a running MS is not supported yet)",
                    ))
                }
                Some(raw) => {
                    legacy = true;
                    (super::decode_state(&raw)?, None, StoredMembership::default())
                }
                None => (MsState::default(), None, StoredMembership::default()),
            },
        };
        Ok(MsStore { log, state: Arc::new(Mutex::new(state)), last, membership, me, legacy })
    }

    /// The state machine, to read.
    pub fn state(&self) -> Arc<Mutex<MsState>> {
        self.state.clone()
    }

    fn save_applied(&self) -> StorageResult<()> {
        let state = super::encode(&*self.state.lock().expect("MS lock")).map_err(io_err)?;
        let rec = AppliedRecord { last: self.last, membership: self.membership.clone(), state };
        self.log.put_records(&[(APPLIED, &to_json(&rec)?)]).map_err(io_err)
    }
}

fn range<RB: RangeBounds<u64>>(r: &RB) -> (u64, u64) {
    let from = match r.start_bound() {
        Bound::Included(x) => *x,
        Bound::Excluded(x) => x.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let to = match r.end_bound() {
        Bound::Included(x) => x.saturating_add(1),
        Bound::Excluded(x) => *x,
        Bound::Unbounded => u64::MAX,
    };
    (from, to)
}

fn read_entries<RB: RangeBounds<u64>>(log: &MetaLog, r: RB) -> StorageResult<Vec<Entry<TypeConfig>>> {
    let (from, to) = range(&r);
    let raw = log.raft_entries(from, to).map_err(|e| StorageError::from(StorageIOError::read_logs(&e)))?;
    raw.iter().map(|(_, b)| from_json(b)).collect()
}

/// Reads the log for replication, beside the storage.
pub struct MsLogReader {
    log: Arc<MetaLog>,
}

impl RaftLogReader<TypeConfig> for MsLogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        read_entries(&self.log, range)
    }
}

impl RaftLogReader<TypeConfig> for MsStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        read_entries(&self.log, range)
    }
}

/// A snapshot's contents, taken when openraft asks for a builder (while
/// it holds the state machine still), so the data is exactly the state as
/// of `last` even if entries are applied before the snapshot is built.
pub struct MsSnapshotBuilder {
    log: Arc<MetaLog>,
    /// The encoded state (or why it could not be encoded).
    data: shoal_common::Result<Vec<u8>>,
    last: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
}

impl RaftSnapshotBuilder<TypeConfig> for MsSnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let data = std::mem::replace(&mut self.data, Ok(Vec::new())).map_err(io_err)?;
        let id = match self.last {
            Some(l) => format!("{}-{}", l.leader_id, l.index),
            None => "empty".to_string(),
        };
        let meta = SnapshotMeta { last_log_id: self.last, last_membership: self.membership.clone(), snapshot_id: id };
        let rec = SnapshotRecord { meta: meta.clone(), data: data.clone() };
        self.log.put_records(&[(SNAPSHOT, &to_json(&rec)?)]).map_err(io_err)?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStorage<TypeConfig> for MsStore {
    type LogReader = MsLogReader;
    type SnapshotBuilder = MsSnapshotBuilder;

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.log.put_records(&[(VOTE, &to_json(vote)?)]).map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        match self.log.record(VOTE).map_err(|e| StorageError::from(StorageIOError::read_vote(&e)))? {
            Some(b) => Ok(Some(from_json(&b)?)),
            None => Ok(None),
        }
    }

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let purged: Option<LogId<NodeId>> = match self.log.record(PURGED).map_err(io_err)? {
            Some(b) => from_json(&b)?,
            None => None,
        };
        let last = match self.log.raft_last().map_err(io_err)? {
            Some((_, b)) => Some(from_json::<Entry<TypeConfig>>(&b)?.log_id),
            None => purged,
        };
        Ok(LogState { last_purged_log_id: purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> MsLogReader {
        MsLogReader { log: self.log.clone() }
    }

    async fn append_to_log<I>(&mut self, entries: I) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
    {
        let mut raw = Vec::new();
        for e in entries {
            raw.push((e.log_id.index, to_json(&e)?));
        }
        self.log.raft_append(&raw).map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn delete_conflict_logs_since(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.log.raft_delete(log_id.index, u64::MAX, &[]).map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge_logs_upto(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let rec = to_json(&Some(log_id))?;
        self.log
            .raft_delete(0, log_id.index.saturating_add(1), &[(PURGED, &rec)])
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn last_applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        Ok((self.last, self.membership.clone()))
    }

    async fn apply_to_state_machine(&mut self, entries: &[Entry<TypeConfig>]) -> StorageResult<Vec<Applied>> {
        let mut out = Vec::with_capacity(entries.len());
        {
            let mut st = self.state.lock().expect("MS lock");
            for e in entries {
                self.last = Some(e.log_id);
                out.push(match &e.payload {
                    EntryPayload::Blank => Applied(Ok(Outcome::Done)),
                    EntryPayload::Normal(cmd) => {
                        let mut next = st.clone();
                        match next.apply(cmd) {
                            Ok(o) => {
                                *st = next;
                                Applied(Ok(o))
                            }
                            Err(e) => Applied(Err(e.to_wire())),
                        }
                    }
                    EntryPayload::Membership(m) => {
                        self.membership = StoredMembership::new(Some(e.log_id), m.clone());
                        Applied(Ok(Outcome::Done))
                    }
                });
            }
        }
        self.save_applied()?;
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> MsSnapshotBuilder {
        let data = super::encode(&*self.state.lock().expect("MS lock"));
        MsSnapshotBuilder { log: self.log.clone(), data, last: self.last, membership: self.membership.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let state = super::decode_state(&data)
            .map_err(|e| StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e)))?;
        let applied = AppliedRecord { last: meta.last_log_id, membership: meta.last_membership.clone(), state: data };
        let snap = SnapshotRecord { meta: meta.clone(), data: applied.state.clone() };
        // The snapshot and the state it sets are written together.
        self.log.put_records(&[(SNAPSHOT, &to_json(&snap)?), (APPLIED, &to_json(&applied)?)]).map_err(io_err)?;
        *self.state.lock().expect("MS lock") = state;
        self.last = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        match self.log.record(SNAPSHOT).map_err(io_err)? {
            Some(b) => {
                let rec: SnapshotRecord = from_json(&b)?;
                Ok(Some(Snapshot { meta: rec.meta, snapshot: Box::new(Cursor::new(rec.data)) }))
            }
            None => Ok(None),
        }
    }
}

/// Sends Raft's messages to other replicas over the transport.
#[derive(Clone, Default)]
pub struct MsNetwork {
    transport: Arc<TcpTransport>,
}

impl MsNetwork {
    pub fn new(transport: Arc<TcpTransport>) -> MsNetwork {
        MsNetwork { transport }
    }
}

/// A connection to one replica.
pub struct MsPeer {
    transport: Arc<TcpTransport>,
    target: NodeId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for MsNetwork {
    type Network = MsPeer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> MsPeer {
        MsPeer { transport: self.transport.clone(), target, addr: node.addr.clone() }
    }
}

impl MsPeer {
    async fn send<Req, Resp, E>(
        &self,
        kind: RaftKind,
        req: &Req,
        option: RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let req = RaftReq { kind, payload };
        match shoal_net::call(&*self.transport, &self.addr, &req, vec![], 0, 0, option.hard_ttl()).await {
            Ok((reply, _)) => {
                let r: Result<Resp, E> =
                    serde_json::from_slice(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Err(e) if e.peer_failed() => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&AnyError::new(&e)))),
        }
    }
}

impl RaftNetwork<TypeConfig> for MsPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send(RaftKind::Append, &rpc, option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.send(RaftKind::Snapshot, &rpc, option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send(RaftKind::Vote, &rpc, option).await
    }
}

/// Answers a Raft message from another replica: the reply is the JSON of
/// openraft's `Result`, which the sender's [`MsPeer`] decodes.
pub async fn serve(raft: &MsRaft, req: RaftReq) -> shoal_common::Result<Vec<u8>> {
    let bad = |e: serde_json::Error| ShoalError::invalid(format!("malformed Raft message: {e}"));
    let encoded = match req.kind {
        RaftKind::Vote => serde_json::to_vec(&raft.vote(serde_json::from_slice(&req.payload).map_err(bad)?).await),
        RaftKind::Append => {
            serde_json::to_vec(&raft.append_entries(serde_json::from_slice(&req.payload).map_err(bad)?).await)
        }
        RaftKind::Snapshot => {
            serde_json::to_vec(&raft.install_snapshot(serde_json::from_slice(&req.payload).map_err(bad)?).await)
        }
    };
    encoded.map_err(|e| ShoalError::Internal(format!("encode a Raft reply: {e}")))
}

/// The Raft settings of the MS: a new leader about a second after the
/// last one's loss on a local network, and snapshots every 1000 entries
/// (keeping 200 behind them for replicas that lag a little).
///
/// A follower that has heard from a leader waits out that leader's lease
/// (openraft sets it to `election_timeout_max`) and then its own election
/// timeout before it stands: 0.9 to 1.2 s here.
pub fn config() -> openraft::Config {
    openraft::Config {
        cluster_name: "shoal-ms".into(),
        heartbeat_interval: 100,
        election_timeout_min: 300,
        election_timeout_max: 600,
        install_snapshot_timeout: 5000,
        max_payload_entries: 64,
        // JSON spells a byte in up to 4: a chunk stays well under a frame body.
        snapshot_max_chunk_size: 128 << 10,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1000),
        max_in_snapshot_log_to_keep: 200,
        ..Default::default()
    }
}

/// A fresh Raft id for a replica added to a running system (those the
/// system was created with have ids 1 to 5): never one a replica had
/// before, so a re-added server cannot vote again under an old id with its
/// vote forgotten.
pub fn new_id() -> NodeId {
    1000 + NodeId::from(rand::random::<u32>())
}

/// The replicas of an MS: this one's id and every member's address.
#[derive(Debug, Clone)]
pub struct Replicas {
    pub me: NodeId,
    pub members: BTreeMap<NodeId, BasicNode>,
    /// Whether the replica with the lowest id may found the group (write
    /// its first membership) if its log is empty: only on the system's first
    /// start. A replica whose MS directory was lost must not found a second
    /// group; it waits for the leader to bring it up to date.
    pub founding: bool,
}

impl Replicas {
    /// The replicas named by the MS address list `addrs` (ids 1, 2, ...),
    /// this one being the one advertised as `me`. `None` if `me` is not in
    /// the list.
    pub fn from_addrs(addrs: &[String], me: &str) -> Option<Replicas> {
        let members: BTreeMap<NodeId, BasicNode> =
            addrs.iter().enumerate().map(|(i, a)| (i as NodeId + 1, BasicNode::new(a))).collect();
        let me = members.iter().find(|(_, n)| n.addr == me).map(|(id, _)| *id)?;
        Some(Replicas { me, members, founding: true })
    }
}
