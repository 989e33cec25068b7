//! Typed messages carried in frames.
//!
//! Each request type implements [`Rpc`], which names its [`Opcode`] and its
//! reply type. A request's metadata body is the postcard encoding of the
//! request struct; its bulk data travels in frame segments. A reply's body is
//! the postcard encoding of `Result<Reply, WireError>`.
//!
//! Every request type has a `validate()` that enforces the caps of
//! [`crate::limits`]; servers call it before doing any work.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Limit, Result, ShoalError, WireError};
use crate::hlc::Epoch;
use crate::ids::{ContId, Oid, PoolId};
use crate::limits::{MAX_IODS, MAX_KEY_LEN, MAX_LIST, MAX_REC_SIZE};
use crate::wire::{Frame, Header, FLAG_REPLY};

/// Operation codes. Values are stable: a new operation gets a new number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum Opcode {
    Ping = 1,
    Update = 2,
    Fetch = 3,
    Punch = 4,
    List = 5,
    TargetQuery = 6,
    StripeLock = 7,
    StripeUnlock = 8,
    MarkStable = 9,
    Restore = 10,
    ObjList = 11,
    RestoreHave = 12,
    /// Takes, tests, releases or renews POSIX file locks.
    FileLock = 15,
    /// A Raft message between management service replicas.
    Raft = 13,
    /// The MS leader asks a server to host an MS replica, or to stop.
    MsHost = 14,
    SysJoin = 20,
    SysHeartbeat = 21,
    SysQuery = 22,
    ClientHello = 23,
    SysReport = 24,
    SysExclude = 25,
    RebuildDone = 26,
    Reintegrate = 27,
    Drain = 28,
    RebuildCtl = 29,
    PoolCreate = 30,
    PoolDestroy = 31,
    PoolList = 32,
    PoolQuery = 33,
    PoolExtend = 34,
    /// Adds a server to the MS replicas, or removes one.
    MsMembers = 35,
    ContCreate = 40,
    ContDestroy = 41,
    ContList = 42,
    ContQuery = 43,
    OidAlloc = 44,
}

impl Opcode {
    /// The opcode's name in snake case, as metrics label it.
    pub fn name(self) -> &'static str {
        match self {
            Opcode::Ping => "ping",
            Opcode::Update => "update",
            Opcode::Fetch => "fetch",
            Opcode::Punch => "punch",
            Opcode::List => "list",
            Opcode::TargetQuery => "target_query",
            Opcode::StripeLock => "stripe_lock",
            Opcode::StripeUnlock => "stripe_unlock",
            Opcode::MarkStable => "mark_stable",
            Opcode::Restore => "restore",
            Opcode::ObjList => "obj_list",
            Opcode::RestoreHave => "restore_have",
            Opcode::FileLock => "file_lock",
            Opcode::Raft => "raft",
            Opcode::MsHost => "ms_host",
            Opcode::SysJoin => "sys_join",
            Opcode::SysHeartbeat => "sys_heartbeat",
            Opcode::SysQuery => "sys_query",
            Opcode::ClientHello => "client_hello",
            Opcode::SysReport => "sys_report",
            Opcode::SysExclude => "sys_exclude",
            Opcode::RebuildDone => "rebuild_done",
            Opcode::Reintegrate => "reintegrate",
            Opcode::Drain => "drain",
            Opcode::RebuildCtl => "rebuild_ctl",
            Opcode::PoolCreate => "pool_create",
            Opcode::PoolDestroy => "pool_destroy",
            Opcode::PoolList => "pool_list",
            Opcode::PoolQuery => "pool_query",
            Opcode::PoolExtend => "pool_extend",
            Opcode::MsMembers => "ms_members",
            Opcode::ContCreate => "cont_create",
            Opcode::ContDestroy => "cont_destroy",
            Opcode::ContList => "cont_list",
            Opcode::ContQuery => "cont_query",
            Opcode::OidAlloc => "oid_alloc",
        }
    }

    /// Whether a reply frame carries an error (postcard encodes `Err` of a
    /// `Result` as variant 1).
    pub fn reply_failed(reply: &Frame) -> bool {
        reply.body.first() == Some(&1)
    }

    /// Maps a wire value to an opcode.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Opcode::Ping,
            2 => Opcode::Update,
            3 => Opcode::Fetch,
            4 => Opcode::Punch,
            5 => Opcode::List,
            6 => Opcode::TargetQuery,
            7 => Opcode::StripeLock,
            8 => Opcode::StripeUnlock,
            9 => Opcode::MarkStable,
            10 => Opcode::Restore,
            11 => Opcode::ObjList,
            12 => Opcode::RestoreHave,
            13 => Opcode::Raft,
            14 => Opcode::MsHost,
            15 => Opcode::FileLock,
            20 => Opcode::SysJoin,
            21 => Opcode::SysHeartbeat,
            22 => Opcode::SysQuery,
            23 => Opcode::ClientHello,
            24 => Opcode::SysReport,
            25 => Opcode::SysExclude,
            26 => Opcode::RebuildDone,
            27 => Opcode::Reintegrate,
            28 => Opcode::Drain,
            29 => Opcode::RebuildCtl,
            30 => Opcode::PoolCreate,
            31 => Opcode::PoolDestroy,
            32 => Opcode::PoolList,
            33 => Opcode::PoolQuery,
            34 => Opcode::PoolExtend,
            35 => Opcode::MsMembers,
            40 => Opcode::ContCreate,
            41 => Opcode::ContDestroy,
            42 => Opcode::ContList,
            43 => Opcode::ContQuery,
            44 => Opcode::OidAlloc,
            _ => return None,
        })
    }
}

/// The `rank()` and `pool()` of a request with `rank` and `pool` fields
/// (`ANY_RANK` and `PoolId(0)` meaning "no check").
macro_rules! addressed {
    () => {
        fn rank(&self) -> Option<u32> {
            (self.rank != ANY_RANK).then_some(self.rank)
        }

        fn pool(&self) -> Option<PoolId> {
            (self.pool != PoolId(0)).then_some(self.pool)
        }
    };
}

/// A request type: its opcode, reply type and validity check.
pub trait Rpc: Serialize + DeserializeOwned + Send + 'static {
    const OP: Opcode;
    type Reply: Serialize + DeserializeOwned + Send + 'static;

    /// Checks the request (and its bulk segments) against the caps.
    fn validate(&self, segments: &[Bytes]) -> Result<()>;

    /// The pool whose map version the receiver checks, if any.
    fn pool(&self) -> Option<PoolId> {
        None
    }

    /// The rank the sender addressed, if it names one: a server of another
    /// rank refuses the request.
    fn rank(&self) -> Option<u32> {
        None
    }

    /// The same write addressed to another target, for a shard's shadow
    /// while a drain copies it there ([`crate::placement::Shard::shadow`]);
    /// `None` for requests that are not writes. Conditions are dropped:
    /// the shard's own target checks them.
    fn retarget(&self, _rank: u32, _target: u32) -> Option<Self>
    where
        Self: Sized,
    {
        None
    }
}

/// Encodes a request into a frame.
pub fn request_frame<R: Rpc>(req: &R, segments: Vec<Bytes>, map_version: u32, token: u128) -> Result<Frame> {
    let body = postcard::to_stdvec(req).map_err(|e| ShoalError::Internal(format!("encode request: {e}")))?;
    Ok(Frame {
        header: Header { flags: 0, opcode: R::OP as u16, request_id: 0, map_version, token },
        body: Bytes::from(body),
        segments,
    })
}

/// Decodes a postcard body that must hold exactly one value.
fn decode_exact<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T> {
    let (v, rest) =
        postcard::take_from_bytes(body).map_err(|e| ShoalError::protocol(format!("malformed {what}: {e}")))?;
    if !rest.is_empty() {
        return Err(ShoalError::protocol(format!("{} stray bytes after the {what}", rest.len())));
    }
    Ok(v)
}

/// Decodes and validates a request body.
pub fn decode_request<R: Rpc>(frame: &Frame) -> Result<R> {
    let req: R = decode_exact(&frame.body, &format!("{:?} request", R::OP))?;
    req.validate(&frame.segments)?;
    Ok(req)
}

/// Encodes a reply to the request whose header is `req`.
pub fn reply_frame<T: Serialize>(req: &Header, map_version: u32, reply: Result<T>, segments: Vec<Bytes>) -> Frame {
    let wire: std::result::Result<T, WireError> = reply.map_err(|e| e.to_wire());
    let (body, segments) = match postcard::to_stdvec(&wire) {
        Ok(b) => (b, segments),
        Err(e) => {
            let err: std::result::Result<(), WireError> =
                Err(ShoalError::Internal(format!("encode reply: {e}")).to_wire());
            (postcard::to_stdvec(&err).unwrap_or_default(), Vec::new())
        }
    };
    Frame {
        header: Header { flags: FLAG_REPLY, opcode: req.opcode, request_id: req.request_id, map_version, token: 0 },
        body: Bytes::from(body),
        segments,
    }
}

/// Decodes a reply body into the reply type or the error it carries.
pub fn decode_reply<T: DeserializeOwned>(frame: &Frame) -> Result<T> {
    let wire: std::result::Result<T, WireError> = decode_exact(&frame.body, "reply")?;
    wire.map_err(ShoalError::from_wire)
}

/// Checks a key against [`MAX_KEY_LEN`]: [`ShoalError::TooLarge`] past it, and
/// `InvalidArgument` naming `what` when empty.
pub fn check_key(what: &str, k: &[u8]) -> Result<()> {
    if k.is_empty() {
        return Err(ShoalError::invalid(format!("{what} must not be empty")));
    }
    if k.len() > MAX_KEY_LEN {
        return Err(ShoalError::TooLarge { limit: Limit::KeyLen, size: k.len() as u64, max: MAX_KEY_LEN as u64 });
    }
    Ok(())
}

fn check_iods(n: usize) -> Result<()> {
    if n > MAX_IODS {
        return Err(ShoalError::TooLarge { limit: Limit::Keys, size: n as u64, max: MAX_IODS as u64 });
    }
    if n == 0 {
        return Err(ShoalError::invalid("a request must name at least one key"));
    }
    Ok(())
}

/// Asks a server who it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingReq {}

/// What a server says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingReply {
    pub version: String,
    pub targets: u32,
    pub epoch: Epoch,
    /// The server's rank, once it has joined.
    pub rank: Option<u32>,
    /// Bytes of request and reply frames the server may hold at once.
    pub frame_budget: u64,
    /// Bytes of that budget in use now.
    pub frame_in_use: u64,
}

impl Rpc for PingReq {
    const OP: Opcode = Opcode::Ping;
    type Reply = PingReply;

    fn validate(&self, _segments: &[Bytes]) -> Result<()> {
        Ok(())
    }
}

/// The shape of a value under an akey.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueKind {
    /// A single value, replaced whole by each update.
    Single,
    /// An array value: `nr` records of `rec_size` bytes from index `start`.
    Array { rec_size: u32, start: u64, nr: u64 },
    /// A single value holding a little-endian u64 that an update only
    /// raises: the stored value becomes max(current, given). The target
    /// applies it atomically (array sizes use it).
    MaxU64,
}

impl ValueKind {
    fn validate(&self) -> Result<()> {
        if let ValueKind::Array { rec_size, start, nr } = *self {
            if rec_size == 0 || rec_size > MAX_REC_SIZE {
                return Err(ShoalError::invalid(format!("record size {rec_size} is outside 1..={MAX_REC_SIZE}")));
            }
            if nr == 0 {
                return Err(ShoalError::invalid("array extent of zero records"));
            }
            if (start as u128 + nr as u128) * rec_size as u128 > u64::MAX as u128 {
                return Err(ShoalError::invalid("array extent runs past the last byte of the array"));
            }
            if (nr as u128) * (rec_size as u128) > crate::limits::MAX_SEGMENT as u128 {
                return Err(ShoalError::invalid(format!(
                    "array extent of {nr} x {rec_size} bytes exceeds one segment"
                )));
            }
        }
        Ok(())
    }

    /// Bytes an array extent covers (`None` for single values).
    pub fn array_bytes(&self) -> Option<u64> {
        match *self {
            ValueKind::Single | ValueKind::MaxU64 => None,
            ValueKind::Array { rec_size, nr, .. } => Some(rec_size as u64 * nr),
        }
    }
}

/// One akey's part of an update: its data is the segment at the same index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateIod {
    pub akey: Vec<u8>,
    pub kind: ValueKind,
    /// crc32c of the segment, computed by the sender before it sent it;
    /// the target verifies it before it stores anything.
    pub crc: u32,
    /// A conditional update: refused (with a conflict) if the target holds
    /// a version of this value's range newer than this epoch, that is, if
    /// the range changed since the version the sender based the update on.
    pub cond: Option<Epoch>,
}

impl UpdateIod {
    /// An unconditional update of `akey` whose data is `data`.
    pub fn new(akey: &[u8], kind: ValueKind, data: &[u8]) -> UpdateIod {
        UpdateIod { akey: akey.to_vec(), kind, crc: crc32c::crc32c(data), cond: None }
    }
}

/// Writes values under one dkey of one object, at one epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateReq {
    /// The pool the container lives in; its map version is checked
    /// (`PoolId(0)`: no pool, no check).
    pub pool: PoolId,
    /// The rank the sender believes it is talking to ([`ANY_RANK`]: no
    /// check); a server of another rank refuses the request.
    pub rank: u32,
    pub target: u32,
    pub cont: ContId,
    pub oid: Oid,
    pub dkey: Vec<u8>,
    pub epoch: Epoch,
    pub iods: Vec<UpdateIod>,
}

impl Rpc for UpdateReq {
    const OP: Opcode = Opcode::Update;
    type Reply = UpdateReply;

    addressed!();

    fn retarget(&self, rank: u32, target: u32) -> Option<Self> {
        let iods = self.iods.iter().map(|i| UpdateIod { cond: None, ..i.clone() }).collect();
        Some(UpdateReq { rank, target, iods, ..self.clone() })
    }

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        check_key("dkey", &self.dkey)?;
        check_iods(self.iods.len())?;
        if self.epoch == 0 || self.epoch == crate::EPOCH_MAX {
            return Err(ShoalError::invalid("update epoch must be between 1 and EPOCH_MAX"));
        }
        if segments.len() != self.iods.len() {
            return Err(ShoalError::invalid(format!(
                "{} I/O descriptors but {} data segments",
                self.iods.len(),
                segments.len()
            )));
        }
        for (iod, seg) in self.iods.iter().zip(segments) {
            check_key("akey", &iod.akey)?;
            iod.kind.validate()?;
            if iod.kind == ValueKind::MaxU64 && seg.len() != 8 {
                return Err(ShoalError::invalid("a max-u64 value is exactly 8 bytes"));
            }
            if let Some(n) = iod.kind.array_bytes() {
                if n != seg.len() as u64 {
                    return Err(ShoalError::invalid(format!(
                        "array extent covers {n} bytes but its segment has {}",
                        seg.len()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The epoch an update was stored at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateReply {
    pub epoch: Epoch,
    /// The server's clock after it applied the update; the client observes
    /// it, so its next epochs are newer than anything this server has seen.
    pub now: Epoch,
}

/// One akey's part of a fetch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchIod {
    pub akey: Vec<u8>,
    pub kind: ValueKind,
}

/// Reads values under one dkey as of `epoch` (newest version <= epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchReq {
    /// The pool the container lives in; its map version is checked
    /// (`PoolId(0)`: no pool, no check).
    pub pool: PoolId,
    /// The rank the sender believes it is talking to ([`ANY_RANK`]: no
    /// check); a server of another rank refuses the request.
    pub rank: u32,
    pub target: u32,
    pub cont: ContId,
    pub oid: Oid,
    pub dkey: Vec<u8>,
    pub epoch: Epoch,
    pub iods: Vec<FetchIod>,
}

impl Rpc for FetchReq {
    const OP: Opcode = Opcode::Fetch;
    type Reply = FetchReply;

    addressed!();

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        check_key("dkey", &self.dkey)?;
        check_iods(self.iods.len())?;
        if !segments.is_empty() {
            return Err(ShoalError::invalid("a fetch request carries no data segments"));
        }
        let mut total = 0u64;
        for iod in &self.iods {
            check_key("akey", &iod.akey)?;
            iod.kind.validate()?;
            total += iod.kind.array_bytes().unwrap_or(0);
        }
        if total > crate::limits::MAX_SEGMENT as u64 {
            return Err(ShoalError::invalid(format!("fetch of {total} bytes exceeds the per-request cap")));
        }
        Ok(())
    }
}

/// What a fetch found for one akey; the data is the reply segment at the
/// same index (empty when nothing is there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fetched {
    /// No visible value.
    Missing,
    /// A single value written at `epoch`.
    Single { epoch: Epoch },
    /// Array records; holes read as zeros. `covered` counts the records of
    /// the requested range that hold written data; `epoch` is the newest
    /// epoch among the extents that supplied them and the punch (if any)
    /// under them: the version of the range.
    Array { covered: u64, epoch: Epoch },
    /// Nothing visible because a punch at `epoch` removed it (an array
    /// range reads as zeros). Unlike `Missing`, it says which version of
    /// the range this is.
    Punched { epoch: Epoch },
}

/// The values found, one per requested akey.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchReply {
    pub values: Vec<Fetched>,
    /// crc32c of each reply segment, carried from the stored checksums
    /// where a segment is one stored value; the receiver verifies them.
    pub crcs: Vec<u32>,
}

impl FetchReply {
    /// Checks every segment against its crc32c.
    pub fn verify(&self, segments: &[Bytes]) -> Result<()> {
        if self.crcs.len() != segments.len() || self.values.len() != segments.len() {
            return Err(ShoalError::protocol("a fetch reply's checksums do not match its segments"));
        }
        for (i, (seg, crc)) in segments.iter().zip(&self.crcs).enumerate() {
            if crc32c::crc32c(seg) != *crc {
                return Err(ShoalError::Damaged(format!(
                    "value {i} of a fetch reply ({} bytes) arrived with a bad crc32c",
                    seg.len()
                )));
            }
        }
        Ok(())
    }
}

/// Removes an object, a dkey or an akey as of `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PunchReq {
    /// The pool the container lives in; its map version is checked
    /// (`PoolId(0)`: no pool, no check).
    pub pool: PoolId,
    /// The rank the sender believes it is talking to ([`ANY_RANK`]: no
    /// check); a server of another rank refuses the request.
    pub rank: u32,
    pub target: u32,
    pub cont: ContId,
    pub oid: Oid,
    pub epoch: Epoch,
    pub dkey: Option<Vec<u8>>,
    pub akey: Option<Vec<u8>>,
}

impl Rpc for PunchReq {
    const OP: Opcode = Opcode::Punch;
    type Reply = UpdateReply;

    addressed!();

    fn retarget(&self, rank: u32, target: u32) -> Option<Self> {
        Some(PunchReq { rank, target, ..self.clone() })
    }

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        if !segments.is_empty() {
            return Err(ShoalError::invalid("a punch request carries no data segments"));
        }
        if self.epoch == 0 || self.epoch == crate::EPOCH_MAX {
            return Err(ShoalError::invalid("punch epoch must be between 1 and EPOCH_MAX"));
        }
        if let Some(d) = &self.dkey {
            check_key("dkey", d)?;
        }
        match (&self.dkey, &self.akey) {
            (None, Some(_)) => Err(ShoalError::invalid("an akey punch needs its dkey")),
            (_, Some(a)) => check_key("akey", a),
            _ => Ok(()),
        }
    }
}

/// Lists dkeys of an object (`dkey` is `None`) or akeys of one dkey, as of
/// `epoch`, starting after `anchor`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListReq {
    /// The pool the container lives in; its map version is checked
    /// (`PoolId(0)`: no pool, no check).
    pub pool: PoolId,
    /// The rank the sender believes it is talking to ([`ANY_RANK`]: no
    /// check); a server of another rank refuses the request.
    pub rank: u32,
    pub target: u32,
    pub cont: ContId,
    pub oid: Oid,
    pub epoch: Epoch,
    pub dkey: Option<Vec<u8>>,
    pub anchor: Option<Vec<u8>>,
    pub limit: u32,
}

impl Rpc for ListReq {
    const OP: Opcode = Opcode::List;
    type Reply = ListReply;

    addressed!();

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        if !segments.is_empty() {
            return Err(ShoalError::invalid("a list request carries no data segments"));
        }
        if let Some(d) = &self.dkey {
            check_key("dkey", d)?;
        }
        if let Some(a) = &self.anchor {
            check_key("anchor", a)?;
        }
        if self.limit == 0 || self.limit > MAX_LIST {
            return Err(ShoalError::invalid(format!("list limit {} is outside 1..={MAX_LIST}", self.limit)));
        }
        Ok(())
    }
}

/// Keys in the store's order; `anchor` is where to continue, `None` at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListReply {
    pub keys: Vec<Vec<u8>>,
    pub anchor: Option<Vec<u8>>,
}

/// The `rank` of a request that does not care which server answers
/// (tools addressing a server directly).
pub const ANY_RANK: u32 = u32::MAX;

/// Most stripes one lock request names.
pub const MAX_LOCK_STRIPES: usize = 64;
/// Longest lease a stripe lock may ask for, in milliseconds.
pub const MAX_LOCK_LEASE_MS: u32 = 60_000;

/// The checks lock and unlock requests share.
fn check_stripes(segments: &[Bytes], dkey: &[u8], stripes: &[u64]) -> Result<()> {
    if !segments.is_empty() {
        return Err(ShoalError::invalid("a stripe lock request carries no data segments"));
    }
    check_key("dkey", dkey)?;
    if stripes.is_empty() || stripes.len() > MAX_LOCK_STRIPES {
        return Err(ShoalError::invalid(format!("name 1..={MAX_LOCK_STRIPES} stripes at a time")));
    }
    Ok(())
}

/// Locks EC stripes of one dkey for a read-modify-write, all or none,
/// waiting while another owner holds any of them. The lock lives on the
/// server of the group's first shard and lapses after `lease_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeLockReq {
    pub pool: PoolId,
    pub rank: u32,
    pub cont: ContId,
    pub oid: Oid,
    pub dkey: Vec<u8>,
    pub stripes: Vec<u64>,
    pub owner: u128,
    pub lease_ms: u32,
}

impl Rpc for StripeLockReq {
    const OP: Opcode = Opcode::StripeLock;
    type Reply = ();

    addressed!();

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        check_stripes(segments, &self.dkey, &self.stripes)?;
        if self.lease_ms == 0 || self.lease_ms > MAX_LOCK_LEASE_MS {
            return Err(ShoalError::invalid(format!("lock lease must be 1..={MAX_LOCK_LEASE_MS} ms")));
        }
        Ok(())
    }
}

/// Longest a file-lock request may wait at the server for a conflicting
/// lock to go, in milliseconds (a blocking lock is a series of such waits,
/// so the client can give up when its caller is interrupted).
pub const MAX_FILE_LOCK_WAIT_MS: u32 = 5_000;

/// What a [`FileLockReq`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileLockOp {
    /// Takes a shared lock on the range.
    Read,
    /// Takes an exclusive lock on the range.
    Write,
    /// Releases what the owner holds in the range (splitting its locks
    /// that reach beyond it).
    Unlock,
    /// Takes nothing: reports a lock that would conflict with an exclusive
    /// (`write`) or shared lock on the range.
    Test { write: bool },
    /// Takes nothing: only renews the session's lease.
    Renew,
    /// Takes again a lock (exclusive if `write`) that the session held
    /// before the server restarted: granted only during the server's grace
    /// period after a restart, when new locks are refused.
    Reclaim { write: bool },
}

/// POSIX record locks (fcntl) and whole-file locks (flock) of one object,
/// kept by the server of the first shard in service of its first dkey
/// group, so every mount of a container sees them. Locks belong to an
/// `owner` within a `session` (one mount); a session's locks lapse
/// together unless it renews its lease. Ranges are inclusive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLockReq {
    pub pool: PoolId,
    pub rank: u32,
    pub cont: ContId,
    pub oid: Oid,
    pub session: u128,
    pub owner: u64,
    /// The locking process, reported to others that test for the lock.
    pub pid: u32,
    pub start: u64,
    pub end: u64,
    pub op: FileLockOp,
    pub lease_ms: u32,
    /// How long to wait for a conflicting lock to go before answering
    /// with the conflict (0: answer at once).
    pub wait_ms: u32,
}

/// A lock as a test reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLockInfo {
    pub start: u64,
    pub end: u64,
    pub write: bool,
    pub pid: u32,
}

/// The answer to a [`FileLockReq`]: the conflicting lock if the request
/// was refused (or, for a test, would be), and how many locks the session
/// still holds on the object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLockReply {
    pub conflict: Option<FileLockInfo>,
    pub held: u32,
}

impl Rpc for FileLockReq {
    const OP: Opcode = Opcode::FileLock;
    type Reply = FileLockReply;

    addressed!();

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        if !segments.is_empty() {
            return Err(ShoalError::invalid("a file lock request carries no data segments"));
        }
        if self.start > self.end {
            return Err(ShoalError::invalid(format!("lock range {}..={} is empty", self.start, self.end)));
        }
        if self.lease_ms == 0 || self.lease_ms > MAX_LOCK_LEASE_MS {
            return Err(ShoalError::invalid(format!("lock lease must be 1..={MAX_LOCK_LEASE_MS} ms")));
        }
        if self.wait_ms > MAX_FILE_LOCK_WAIT_MS {
            return Err(ShoalError::invalid(format!("a lock request waits at most {MAX_FILE_LOCK_WAIT_MS} ms")));
        }
        Ok(())
    }
}

/// Releases stripes locked by `owner` (stripes it does not hold are left
/// alone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeUnlockReq {
    pub pool: PoolId,
    pub rank: u32,
    pub cont: ContId,
    pub oid: Oid,
    pub dkey: Vec<u8>,
    pub stripes: Vec<u64>,
    pub owner: u128,
}

impl Rpc for StripeUnlockReq {
    const OP: Opcode = Opcode::StripeUnlock;
    type Reply = ();

    addressed!();

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        check_stripes(segments, &self.dkey, &self.stripes)
    }
}

/// Tells a target that the write (or punch) at `epoch` of `dkey` (`None`:
/// a punch of the whole object) reached every shard of its group, as the
/// writer saw. For EC objects, aggregation may then remove what it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StableReq {
    pub pool: PoolId,
    pub rank: u32,
    pub target: u32,
    pub cont: ContId,
    pub oid: Oid,
    pub dkey: Option<Vec<u8>>,
    pub epoch: Epoch,
}

impl Rpc for StableReq {
    const OP: Opcode = Opcode::MarkStable;
    type Reply = ();

    addressed!();

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        if !segments.is_empty() {
            return Err(ShoalError::invalid("a stable mark carries no data segments"));
        }
        if let Some(d) = &self.dkey {
            check_key("dkey", d)?;
        }
        if self.epoch == 0 || self.epoch == crate::EPOCH_MAX {
            return Err(ShoalError::invalid("a stable mark's epoch must be between 1 and EPOCH_MAX"));
        }
        Ok(())
    }
}

/// What a restored item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RestoreKind {
    /// A single-value version (its bytes are the segment).
    Single,
    /// An extent piece starting at byte `start` (its bytes are the segment;
    /// it never crosses a 1 MiB boundary).
    Extent { start: u64 },
    /// A punch of the whole object (no segment bytes).
    PunchObject,
    /// A punch of the dkey (no segment bytes).
    PunchDkey,
    /// A punch of the akey (no segment bytes).
    PunchAkey,
}

/// One version or punch put back by rebuild, exactly as it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreItem {
    pub akey: Vec<u8>,
    pub kind: RestoreKind,
    pub epoch: Epoch,
    /// crc32c of the segment (0 for punches).
    pub crc: u32,
    /// Record size of an extent (0 for single values).
    pub rec_size: u32,
}

/// Puts versions and punches of one dkey back on a target (rebuild): each
/// at its own epoch and key, whatever the target holds newer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReq {
    pub pool: PoolId,
    pub rank: u32,
    pub target: u32,
    pub cont: ContId,
    pub oid: Oid,
    pub dkey: Vec<u8>,
    pub items: Vec<RestoreItem>,
}

impl Rpc for RestoreReq {
    const OP: Opcode = Opcode::Restore;
    type Reply = ();

    addressed!();

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        check_key("dkey", &self.dkey)?;
        check_iods(self.items.len())?;
        if segments.len() != self.items.len() {
            return Err(ShoalError::invalid("a restore carries one segment per item"));
        }
        for (it, seg) in self.items.iter().zip(segments) {
            match it.kind {
                RestoreKind::Single | RestoreKind::Extent { .. } | RestoreKind::PunchAkey => {
                    check_key("akey", &it.akey)?
                }
                RestoreKind::PunchObject | RestoreKind::PunchDkey => {}
            }
            if let RestoreKind::Extent { start } = it.kind {
                if seg.is_empty() || start / (1 << 20) != (start + seg.len() as u64 - 1) / (1 << 20) {
                    return Err(ShoalError::invalid(
                        "a restored extent piece must be 1 byte or more within one 1 MiB bucket",
                    ));
                }
            }
            if it.epoch == 0 || it.epoch == crate::EPOCH_MAX {
                return Err(ShoalError::invalid("a restored version's epoch must be between 1 and EPOCH_MAX"));
            }
        }
        Ok(())
    }
}

/// Asks a target which of some versions and punches of one dkey it holds
/// already (their bytes are not sent): a server coming back after an
/// outage is sent only what it missed. The reply has one flag per item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreHaveReq {
    pub pool: PoolId,
    pub rank: u32,
    pub target: u32,
    pub cont: ContId,
    pub oid: Oid,
    pub dkey: Vec<u8>,
    pub items: Vec<RestoreItem>,
}

impl Rpc for RestoreHaveReq {
    const OP: Opcode = Opcode::RestoreHave;
    type Reply = Vec<bool>;

    addressed!();

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        check_key("dkey", &self.dkey)?;
        check_iods(self.items.len())?;
        if !segments.is_empty() {
            return Err(ShoalError::invalid("a restore-have request carries no data segments"));
        }
        Ok(())
    }
}

/// Which Raft message a [`RaftReq`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftKind {
    Vote,
    Append,
    Snapshot,
}

/// A Raft message from one management service replica to another. The
/// message itself is opaque here (the MS encodes it); the reply carries
/// the answer the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftReq {
    pub kind: RaftKind,
    pub payload: Vec<u8>,
}

impl Rpc for RaftReq {
    const OP: Opcode = Opcode::Raft;
    type Reply = Vec<u8>;

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        if !segments.is_empty() {
            return Err(ShoalError::invalid("a Raft message carries no data segments"));
        }
        Ok(())
    }
}

/// Lists the objects of a container a target holds shards of, in OID
/// order, after `after`: at most `limit` (at most [`MAX_LIST`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjListReq {
    pub pool: PoolId,
    pub rank: u32,
    pub target: u32,
    pub cont: ContId,
    pub after: Option<Oid>,
    pub limit: u32,
}

/// A page of a target's objects; `more` when the listing goes on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjListReply {
    pub oids: Vec<Oid>,
    pub more: bool,
}

impl Rpc for ObjListReq {
    const OP: Opcode = Opcode::ObjList;
    type Reply = ObjListReply;

    addressed!();

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        if !segments.is_empty() {
            return Err(ShoalError::invalid("an object listing carries no data segments"));
        }
        if self.limit == 0 || self.limit > MAX_LIST {
            return Err(ShoalError::invalid(format!("an object listing returns 1 to {MAX_LIST} objects")));
        }
        Ok(())
    }
}

/// Asks a target for its usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetQueryReq {
    pub target: u32,
}

/// A target's usage and health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetQueryReply {
    pub target: u32,
    pub data_bytes: u64,
    pub free_bytes: u64,
    pub poisoned: bool,
    /// Names the file system holding the free bytes: targets with one
    /// `space_id` (not 0) share them.
    pub space_id: u64,
}

impl Rpc for TargetQueryReq {
    const OP: Opcode = Opcode::TargetQuery;
    type Reply = TargetQueryReply;

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        if !segments.is_empty() {
            return Err(ShoalError::invalid("a query carries no data segments"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Entity;

    #[test]
    fn requests_and_replies_round_trip() {
        let req = UpdateReq {
            pool: PoolId(0),
            rank: ANY_RANK,
            target: 1,
            cont: ContId(7),
            oid: Oid::new(1, 2),
            dkey: b"d".to_vec(),
            epoch: 5,
            iods: vec![UpdateIod::new(b"a", ValueKind::Array { rec_size: 1, start: 0, nr: 3 }, b"abc")],
        };
        let f = request_frame(&req, vec![Bytes::from_static(b"abc")], 3, 9).unwrap();
        assert_eq!(decode_request::<UpdateReq>(&f).unwrap(), req);

        let r = reply_frame(&f.header, 3, Ok(UpdateReply { epoch: 5, now: 6 }), vec![]);
        assert_eq!(r.header.request_id, f.header.request_id);
        assert_eq!(decode_reply::<UpdateReply>(&r).unwrap().epoch, 5);
        let r = reply_frame::<UpdateReply>(&f.header, 3, Err(ShoalError::not_found(Entity::Other, "x")), vec![]);
        assert_eq!(decode_reply::<UpdateReply>(&r), Err(ShoalError::not_found(Entity::Other, "x")));
    }

    #[test]
    fn validation_enforces_the_caps() {
        let mut req = UpdateReq {
            pool: PoolId(0),
            rank: ANY_RANK,
            target: 0,
            cont: ContId(1),
            oid: Oid::new(0, 1),
            dkey: vec![0; MAX_KEY_LEN + 1],
            epoch: 1,
            iods: vec![UpdateIod::new(b"a", ValueKind::Single, b"x")],
        };
        let segs = [Bytes::from_static(b"x")];
        assert!(req.validate(&segs).is_err());
        req.dkey = b"d".to_vec();
        assert!(req.validate(&segs).is_ok());
        assert!(req.validate(&[]).is_err());
        req.iods[0].kind = ValueKind::Array { rec_size: 4, start: 0, nr: 2 };
        assert!(req.validate(&segs).is_err(), "segment length must match the extent");
        req.iods[0].kind = ValueKind::Array { rec_size: 1, start: u64::MAX, nr: 2 };
        assert!(req.validate(&segs).is_err());
    }

    #[test]
    fn garbage_bodies_are_protocol_errors() {
        let f = Frame { body: Bytes::from_static(&[0xff; 7]), ..Frame::default() };
        assert!(matches!(decode_request::<UpdateReq>(&f), Err(ShoalError::Protocol(_))));
        let mut f = request_frame(&TargetQueryReq { target: 1 }, vec![], 0, 0).unwrap();
        assert!(decode_request::<TargetQueryReq>(&f).is_ok());
        f.body = Bytes::from([&f.body[..], b"junk"].concat());
        assert!(matches!(decode_request::<TargetQueryReq>(&f), Err(ShoalError::Protocol(_))));
    }
}
