//! The errors that cross the wire, each with a stable numeric code.
//!
//! [`ShoalError::code`] and [`ShoalError::from_wire`] are the one place where
//! codes are mapped; codes never change meaning once shipped.
//!
//! Match on [`ShoalError::kind`] (stable, only ever added to) rather than
//! on variants or message text; the structured variants say more where a
//! caller can act on it: what was not found ([`Entity`]), which limit a
//! request exceeded ([`Limit`]) and by how much, and the underlying
//! `std::io::Error` of a failed connection or input through
//! [`std::error::Error::source`].
//!
//! # Examples
//!
//! ```
//! use shoal_common::error::{ErrorKind, Limit, Entity};
//! use shoal_common::ShoalError;
//!
//! fn explain(e: &ShoalError) -> String {
//!     match e {
//!         ShoalError::NotFound { what: Entity::Pool, .. } => "create the pool first".into(),
//!         ShoalError::TooLarge { limit: Limit::KeyLen, max, .. } => format!("keep keys under {max} bytes"),
//!         e if e.is_retryable() => "try again".into(),
//!         e => e.to_string(),
//!     }
//! }
//! let e = ShoalError::TooLarge { limit: Limit::KeyLen, size: 5000, max: 4096 };
//! assert_eq!(e.kind(), ErrorKind::InvalidArgument);
//! assert_eq!(explain(&e), "keep keys under 4096 bytes");
//! ```

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Shorthand for results carrying a [`ShoalError`].
pub type Result<T, E = ShoalError> = std::result::Result<T, E>;

/// Every error a Shoal peer can report to another, and the client library
/// to its caller.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ShoalError {
    /// The request is malformed or names something impossible.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The named pool, container, object, key or target does not exist
    /// (`what` says which of them).
    #[error("not found: {message}")]
    NotFound { what: Entity, message: String },
    /// Stored data failed its checksum; the bytes are not returned.
    #[error("checksum mismatch: {0}")]
    Checksum(String),
    /// A previous fsync failed; the target refuses to serve until restarted.
    #[error("target {0} is poisoned by an earlier I/O failure and serves nothing")]
    Poisoned(u32),
    /// The target has no room for the write; nothing was written.
    #[error("no space left: {0}")]
    NoSpace(String),
    /// The sender's pool map is older than the receiver's.
    #[error("stale pool map: sender has version {sent}, server has {current}")]
    StaleMap { sent: u32, current: u32 },
    /// The handle token does not grant this operation.
    #[error("permission denied: {0}")]
    NoPermission(String),
    /// A storage-level I/O error.
    #[error("I/O error: {0}")]
    Io(String),
    /// The peer violated the wire protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer did not answer in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The peer could not be reached or the connection broke.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The server is shutting down or overloaded; the request was not run.
    #[error("busy: {0}")]
    Busy(String),
    /// A bug: an invariant did not hold.
    #[error("internal error: {0}")]
    Internal(String),
    /// The target holds a version newer than the update (or a change since
    /// the version a conditional update was based on); nothing was
    /// written. `server_now` is the target's clock: a client observes it
    /// and retries with a newer epoch (or re-reads, for a conditional
    /// update).
    #[error("conflict: {message}")]
    Conflict { server_now: u64, message: String },
    /// A value arrived with a checksum that does not match its bytes (it
    /// was damaged on the way, or in the receiver's memory); nothing of it
    /// was stored. Sending it again may succeed.
    #[error("damaged in transit: {0}")]
    Damaged(String),
    /// The management service replica asked does not lead; the request
    /// was not run. Callers go on to another replica (kind
    /// [`ErrorKind::Busy`]; `shoal_net::call_ms` does it by itself).
    #[error("{0}")]
    NotLeader(String),
    /// What the request would create exists already (`what` says what);
    /// nothing was changed.
    #[error("exists already: {message}")]
    Exists { what: Entity, message: String },
    /// A key, value, name or request is larger than `limit` allows:
    /// `size` against at most `max`. Nothing was stored. Its kind is
    /// [`ErrorKind::InvalidArgument`]; a server's refusal of the same kind
    /// arrives as [`ShoalError::InvalidArgument`].
    #[error("{}", too_large(*limit, *size, *max))]
    TooLarge { limit: Limit, size: u64, max: u64 },
    /// The connection to `peer` could not be made or broke; `source` is
    /// why. Retryable, like [`ShoalError::Unreachable`] (its kind).
    #[error("unreachable: {peer}: {source}")]
    Connection {
        peer: String,
        #[source]
        source: IoCause,
    },
    /// `peer` broke the wire protocol on its connection (a malformed or
    /// truncated frame): the connection was closed. The peer is treated as
    /// down by the data path (other copies are used) but a retry against it
    /// cannot help: not retryable. Its kind is [`ErrorKind::Protocol`].
    #[error("protocol error from {peer}: {message}")]
    BadPeer { peer: String, message: String },
    /// Reading the caller's input (or writing the caller's output) failed;
    /// `source` is the caller's `std::io::Error`. Its kind is
    /// [`ErrorKind::Io`].
    #[error("{what}: {source}")]
    Caller {
        what: String,
        #[source]
        source: IoCause,
    },
}

/// The `std::io::Error` behind a [`ShoalError::Connection`] or
/// [`ShoalError::Caller`], shared so that the error stays `Clone`.
/// `source()` gives the `std::io::Error` itself, to downcast to.
#[derive(Debug, Clone)]
pub struct IoCause(pub Arc<std::io::Error>);

impl From<std::io::Error> for IoCause {
    fn from(e: std::io::Error) -> IoCause {
        IoCause(Arc::new(e))
    }
}

impl std::ops::Deref for IoCause {
    type Target = std::io::Error;
    fn deref(&self) -> &std::io::Error {
        &self.0
    }
}

impl std::fmt::Display for IoCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

fn too_large(limit: Limit, size: u64, max: u64) -> String {
    let unit = |n: u64| {
        if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
            format!("{} MiB", n >> 20)
        } else {
            format!("{n} bytes")
        }
    };
    match limit {
        Limit::KeyLen => format!("a key of {size} bytes is longer than the {max} bytes a key may have"),
        Limit::ValueLen => format!(
            "a value of {size} bytes is larger than the {} a key-value pair may hold; store it in an array",
            unit(max)
        ),
        Limit::NameLen => format!("a name of {size} bytes is longer than the {max} bytes a name may have"),
        Limit::Keys => format!("{size} keys in one request are more than the {max} one request may carry"),
        Limit::RecordSize => format!("a record of {size} bytes is larger than the {} a record may be", unit(max)),
        Limit::ArraySize => format!("offset {size} is past the largest array size, {max} bytes"),
    }
}

/// What a [`ShoalError::NotFound`] or [`ShoalError::Exists`] is about
/// (stable codes; only ever added).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Entity {
    /// Something else, or an older peer did not say.
    Other,
    Pool,
    Container,
    /// The container existed and was destroyed (its handles are dead).
    ContainerDestroyed,
    Object,
    Key,
    Server,
    Target,
    Snapshot,
    /// No management service at the address asked (or none configured).
    ManagementService,
    /// The cluster file or the `$SHOAL_MS` setting.
    ClusterConfig,
}

impl Entity {
    const ALL: [Entity; 11] = [
        Entity::Other,
        Entity::Pool,
        Entity::Container,
        Entity::ContainerDestroyed,
        Entity::Object,
        Entity::Key,
        Entity::Server,
        Entity::Target,
        Entity::Snapshot,
        Entity::ManagementService,
        Entity::ClusterConfig,
    ];

    fn code(self) -> u32 {
        Entity::ALL.iter().position(|m| *m == self).expect("listed") as u32
    }

    fn from_code(c: u32) -> Entity {
        Entity::ALL.get(c as usize).copied().unwrap_or(Entity::Other)
    }
}

/// Which documented limit a [`ShoalError::TooLarge`] names (the values are
/// in [`crate::limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Limit {
    /// A key (KV key, object dkey or akey): [`crate::limits::MAX_KEY_LEN`].
    KeyLen,
    /// A key-value value or single value: [`crate::limits::MAX_SEGMENT`].
    ValueLen,
    /// A pool, container or object name: [`crate::limits::MAX_NAME_LEN`].
    NameLen,
    /// Keys (akeys) in one update or fetch: [`crate::limits::MAX_IODS`].
    Keys,
    /// An array value's record size: [`crate::limits::MAX_REC_SIZE`].
    RecordSize,
    /// An array's offset plus length: `u64::MAX`.
    ArraySize,
}

impl PartialEq for ShoalError {
    /// Equal when of the same variant with the same fields; errors with a
    /// source compare the source's kind and message.
    fn eq(&self, other: &ShoalError) -> bool {
        use ShoalError::*;
        let io = |a: &IoCause, b: &IoCause| a.kind() == b.kind() && a.to_string() == b.to_string();
        match (self, other) {
            (Connection { peer: a, source: x }, Connection { peer: b, source: y }) => a == b && io(x, y),
            (Caller { what: a, source: x }, Caller { what: b, source: y }) => a == b && io(x, y),
            (TooLarge { limit: a, size: s, max: m }, TooLarge { limit: b, size: t, max: n }) => {
                a == b && s == t && m == n
            }
            (BadPeer { peer: a, message: x }, BadPeer { peer: b, message: y }) => a == b && x == y,
            (a, b) => std::mem::discriminant(a) == std::mem::discriminant(b) && a.to_wire() == b.to_wire(),
        }
    }
}

impl Eq for ShoalError {}

/// What kind of error a [`ShoalError`] is, to match on without its
/// message (stable: kinds are only ever added).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    Checksum,
    Poisoned,
    NoSpace,
    StaleMap,
    NoPermission,
    Io,
    Protocol,
    Timeout,
    Unreachable,
    Busy,
    Internal,
    Conflict,
    Damaged,
    /// What a request would create exists already.
    Exists,
}

impl ShoalError {
    /// What kind of error this is.
    ///
    /// # Examples
    ///
    /// ```
    /// use shoal_common::error::{Entity, ErrorKind};
    /// use shoal_common::ShoalError;
    ///
    /// let e = ShoalError::NotFound { what: Entity::Pool, message: "pool tank".into() };
    /// assert_eq!(e.kind(), ErrorKind::NotFound);
    /// assert!(!e.is_retryable());
    /// ```
    pub fn kind(&self) -> ErrorKind {
        match self {
            ShoalError::InvalidArgument(_) | ShoalError::TooLarge { .. } => ErrorKind::InvalidArgument,
            ShoalError::NotFound { .. } => ErrorKind::NotFound,
            ShoalError::Checksum(_) => ErrorKind::Checksum,
            ShoalError::Poisoned(_) => ErrorKind::Poisoned,
            ShoalError::NoSpace(_) => ErrorKind::NoSpace,
            ShoalError::StaleMap { .. } => ErrorKind::StaleMap,
            ShoalError::NoPermission(_) => ErrorKind::NoPermission,
            ShoalError::Io(_) => ErrorKind::Io,
            ShoalError::Protocol(_) | ShoalError::BadPeer { .. } => ErrorKind::Protocol,
            ShoalError::Timeout(_) => ErrorKind::Timeout,
            ShoalError::Unreachable(_) | ShoalError::Connection { .. } => ErrorKind::Unreachable,
            ShoalError::Busy(_) | ShoalError::NotLeader(_) => ErrorKind::Busy,
            ShoalError::Internal(_) => ErrorKind::Internal,
            ShoalError::Conflict { .. } => ErrorKind::Conflict,
            ShoalError::Damaged(_) => ErrorKind::Damaged,
            ShoalError::Caller { .. } => ErrorKind::Io,
            ShoalError::Exists { .. } => ErrorKind::Exists,
        }
    }

    /// A [`ShoalError::Exists`] about `what`.
    pub fn exists(what: Entity, msg: impl Into<String>) -> Self {
        ShoalError::Exists { what, message: msg.into() }
    }

    /// A [`ShoalError::NotFound`] about `what`.
    pub fn not_found(what: Entity, msg: impl Into<String>) -> Self {
        ShoalError::NotFound { what, message: msg.into() }
    }

    /// What this error says is missing, if it is a [`ShoalError::NotFound`].
    pub fn missing(&self) -> Option<Entity> {
        match self {
            ShoalError::NotFound { what, .. } => Some(*what),
            _ => None,
        }
    }

    /// Whether the peer that produced this error should be taken for down
    /// (out of reach, or broken): the data path then tries another copy or
    /// decodes, instead of failing the call.
    pub fn peer_failed(&self) -> bool {
        matches!(self.kind(), ErrorKind::Unreachable | ErrorKind::Timeout) || matches!(self, ShoalError::BadPeer { .. })
    }

    /// An [`ShoalError::InvalidArgument`] with the given message.
    pub fn invalid(msg: impl Into<String>) -> Self {
        ShoalError::InvalidArgument(msg.into())
    }

    /// An [`ShoalError::Protocol`] with the given message.
    pub fn protocol(msg: impl Into<String>) -> Self {
        ShoalError::Protocol(msg.into())
    }

    /// What a server answers about a container that was destroyed.
    pub fn cont_destroyed(cont: crate::ids::ContId) -> Self {
        ShoalError::not_found(Entity::ContainerDestroyed, format!("container {cont} was destroyed"))
    }

    /// Whether this says the container asked about was destroyed.
    pub fn is_cont_destroyed(&self) -> bool {
        self.missing() == Some(Entity::ContainerDestroyed)
    }

    /// The stable wire code of this error.
    pub fn code(&self) -> u16 {
        match self {
            ShoalError::InvalidArgument(_) | ShoalError::TooLarge { .. } => 1,
            ShoalError::NotFound { .. } => 2,
            ShoalError::Checksum(_) => 3,
            ShoalError::Poisoned(_) => 4,
            ShoalError::NoSpace(_) => 5,
            ShoalError::StaleMap { .. } => 6,
            ShoalError::NoPermission(_) => 7,
            ShoalError::Io(_) => 8,
            ShoalError::Protocol(_) | ShoalError::BadPeer { .. } => 9,
            ShoalError::Timeout(_) => 10,
            ShoalError::Unreachable(_) | ShoalError::Connection { .. } => 11,
            ShoalError::Busy(_) => 12,
            ShoalError::Internal(_) => 13,
            ShoalError::Conflict { .. } => 14,
            ShoalError::Damaged(_) => 15,
            ShoalError::Caller { .. } => 8,
            ShoalError::Exists { .. } => 16,
            ShoalError::NotLeader(_) => 17,
        }
    }

    /// Whether a retry against the same or another server may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ShoalError::StaleMap { .. }
                | ShoalError::Timeout(_)
                | ShoalError::Unreachable(_)
                | ShoalError::Connection { .. }
                | ShoalError::Busy(_)
                | ShoalError::NotLeader(_)
                | ShoalError::Conflict { .. }
                | ShoalError::Damaged(_)
        )
    }

    /// The serializable form of this error. The client-side variants
    /// travel as their kind's plain variant, with their text.
    pub fn to_wire(&self) -> WireError {
        let (a, b) = match self {
            ShoalError::NotFound { what, .. } | ShoalError::Exists { what, .. } => (what.code(), 0),
            ShoalError::StaleMap { sent, current } => (*sent, *current),
            ShoalError::Poisoned(t) => (*t, 0),
            ShoalError::Conflict { server_now, .. } => ((server_now >> 32) as u32, *server_now as u32),
            _ => (0, 0),
        };
        let message = match self {
            ShoalError::InvalidArgument(m)
            | ShoalError::NotFound { message: m, .. }
            | ShoalError::Exists { message: m, .. }
            | ShoalError::Checksum(m)
            | ShoalError::NoSpace(m)
            | ShoalError::NoPermission(m)
            | ShoalError::Io(m)
            | ShoalError::Protocol(m)
            | ShoalError::Timeout(m)
            | ShoalError::Unreachable(m)
            | ShoalError::Busy(m)
            | ShoalError::NotLeader(m)
            | ShoalError::Internal(m)
            | ShoalError::Conflict { message: m, .. }
            | ShoalError::Damaged(m) => m.clone(),
            ShoalError::StaleMap { .. } | ShoalError::Poisoned(_) => String::new(),
            ShoalError::TooLarge { .. } | ShoalError::Connection { .. } | ShoalError::Caller { .. } => self.to_string(),
            ShoalError::BadPeer { peer, message } => format!("{peer}: {message}"),
        };
        WireError { code: self.code(), a, b, message }
    }

    /// Rebuilds an error from its wire form. Unknown codes become
    /// [`ShoalError::Internal`] so that a newer peer never crashes an older one.
    pub fn from_wire(w: WireError) -> Self {
        let m = w.message;
        match w.code {
            1 => ShoalError::InvalidArgument(m),
            2 => ShoalError::NotFound { what: Entity::from_code(w.a), message: m },
            3 => ShoalError::Checksum(m),
            4 => ShoalError::Poisoned(w.a),
            5 => ShoalError::NoSpace(m),
            6 => ShoalError::StaleMap { sent: w.a, current: w.b },
            7 => ShoalError::NoPermission(m),
            8 => ShoalError::Io(m),
            9 => ShoalError::Protocol(m),
            10 => ShoalError::Timeout(m),
            11 => ShoalError::Unreachable(m),
            12 => ShoalError::Busy(m),
            13 => ShoalError::Internal(m),
            14 => ShoalError::Conflict { server_now: ((w.a as u64) << 32) | w.b as u64, message: m },
            15 => ShoalError::Damaged(m),
            17 => ShoalError::NotLeader(m),
            16 => ShoalError::Exists { what: Entity::from_code(w.a), message: m },
            other => ShoalError::Internal(format!("unknown error code {other}: {m}")),
        }
    }
}

/// The serialized form of a [`ShoalError`]: a stable code, two numeric
/// arguments and a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: u16,
    pub a: u32,
    pub b: u32,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_round_trips_through_its_wire_form() {
        let all = [
            ShoalError::invalid("x"),
            ShoalError::not_found(Entity::Pool, "x"),
            ShoalError::not_found(Entity::ContainerDestroyed, "x"),
            ShoalError::Checksum("x".into()),
            ShoalError::Poisoned(3),
            ShoalError::NoSpace("x".into()),
            ShoalError::StaleMap { sent: 1, current: 2 },
            ShoalError::NoPermission("x".into()),
            ShoalError::Io("x".into()),
            ShoalError::protocol("x"),
            ShoalError::Timeout("x".into()),
            ShoalError::Unreachable("x".into()),
            ShoalError::Busy("x".into()),
            ShoalError::Internal("x".into()),
            ShoalError::Conflict { server_now: 0x1234_5678_9abc_def0, message: "x".into() },
            ShoalError::Damaged("x".into()),
            ShoalError::exists(Entity::Container, "x"),
            ShoalError::NotLeader("x".into()),
        ];
        for e in all {
            assert_eq!(ShoalError::from_wire(e.to_wire()), e);
        }
    }

    #[test]
    fn client_side_variants_travel_as_their_kind_and_keep_their_cause() {
        use std::error::Error as _;
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = ShoalError::Connection { peer: "h:1".into(), source: io.into() };
        assert_eq!(e.kind(), ErrorKind::Unreachable);
        assert!(e.is_retryable() && e.peer_failed());
        let cause = e.source().expect("a source");
        assert_eq!(cause.downcast_ref::<std::io::Error>().unwrap().kind(), std::io::ErrorKind::ConnectionRefused);
        assert_eq!(ShoalError::from_wire(e.to_wire()).kind(), ErrorKind::Unreachable);

        let bad = ShoalError::BadPeer { peer: "h:1".into(), message: "bad magic".into() };
        assert_eq!(bad.kind(), ErrorKind::Protocol);
        assert!(!bad.is_retryable() && bad.peer_failed());
        assert!(!ShoalError::protocol("refused").peer_failed());

        let big = ShoalError::TooLarge { limit: Limit::ValueLen, size: 70 << 20, max: 64 << 20 };
        assert_eq!(big.kind(), ErrorKind::InvalidArgument);
        assert!(big.to_string().contains("64 MiB") && big.to_string().contains("array"), "{big}");
        assert_eq!(ShoalError::from_wire(big.to_wire()), ShoalError::InvalidArgument(big.to_string()));

        let gone = ShoalError::cont_destroyed(crate::ids::ContId(7));
        assert!(ShoalError::from_wire(gone.to_wire()).is_cont_destroyed());
        assert_eq!(
            ShoalError::from_wire(WireError { code: 2, a: 999, b: 0, message: "x".into() }).missing(),
            Some(Entity::Other)
        );
    }
}
