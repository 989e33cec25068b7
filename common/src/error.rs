//! The errors that cross the wire, each with a stable numeric code.
//!
//! [`ShoalError::code`] and [`ShoalError::from_wire`] are the one place where
//! codes are mapped; codes never change meaning once shipped.

use serde::{Deserialize, Serialize};

/// Shorthand for results carrying a [`ShoalError`].
pub type Result<T, E = ShoalError> = std::result::Result<T, E>;

/// Every error a Shoal peer can report to another.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShoalError {
    /// The request is malformed or names something impossible.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The named pool, container, object, key or target does not exist.
    #[error("not found: {0}")]
    NotFound(String),
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
}

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
}

impl ShoalError {
    /// What kind of error this is.
    ///
    /// # Examples
    ///
    /// ```
    /// use shoal_common::error::ErrorKind;
    /// use shoal_common::ShoalError;
    ///
    /// let e = ShoalError::NotFound("pool tank".into());
    /// assert_eq!(e.kind(), ErrorKind::NotFound);
    /// assert!(!e.is_retryable());
    /// ```
    pub fn kind(&self) -> ErrorKind {
        match self {
            ShoalError::InvalidArgument(_) => ErrorKind::InvalidArgument,
            ShoalError::NotFound(_) => ErrorKind::NotFound,
            ShoalError::Checksum(_) => ErrorKind::Checksum,
            ShoalError::Poisoned(_) => ErrorKind::Poisoned,
            ShoalError::NoSpace(_) => ErrorKind::NoSpace,
            ShoalError::StaleMap { .. } => ErrorKind::StaleMap,
            ShoalError::NoPermission(_) => ErrorKind::NoPermission,
            ShoalError::Io(_) => ErrorKind::Io,
            ShoalError::Protocol(_) => ErrorKind::Protocol,
            ShoalError::Timeout(_) => ErrorKind::Timeout,
            ShoalError::Unreachable(_) => ErrorKind::Unreachable,
            ShoalError::Busy(_) => ErrorKind::Busy,
            ShoalError::Internal(_) => ErrorKind::Internal,
            ShoalError::Conflict { .. } => ErrorKind::Conflict,
            ShoalError::Damaged(_) => ErrorKind::Damaged,
        }
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
        ShoalError::NotFound(format!("container {cont} was destroyed"))
    }

    /// Whether this is [`ShoalError::cont_destroyed`] for `cont`.
    pub fn is_cont_destroyed(&self, cont: crate::ids::ContId) -> bool {
        *self == ShoalError::cont_destroyed(cont)
    }

    /// The stable wire code of this error.
    pub fn code(&self) -> u16 {
        match self {
            ShoalError::InvalidArgument(_) => 1,
            ShoalError::NotFound(_) => 2,
            ShoalError::Checksum(_) => 3,
            ShoalError::Poisoned(_) => 4,
            ShoalError::NoSpace(_) => 5,
            ShoalError::StaleMap { .. } => 6,
            ShoalError::NoPermission(_) => 7,
            ShoalError::Io(_) => 8,
            ShoalError::Protocol(_) => 9,
            ShoalError::Timeout(_) => 10,
            ShoalError::Unreachable(_) => 11,
            ShoalError::Busy(_) => 12,
            ShoalError::Internal(_) => 13,
            ShoalError::Conflict { .. } => 14,
            ShoalError::Damaged(_) => 15,
        }
    }

    /// Whether a retry against the same or another server may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ShoalError::StaleMap { .. }
                | ShoalError::Timeout(_)
                | ShoalError::Unreachable(_)
                | ShoalError::Busy(_)
                | ShoalError::Conflict { .. }
                | ShoalError::Damaged(_)
        )
    }

    /// The serializable form of this error.
    pub fn to_wire(&self) -> WireError {
        let (a, b) = match self {
            ShoalError::StaleMap { sent, current } => (*sent, *current),
            ShoalError::Poisoned(t) => (*t, 0),
            ShoalError::Conflict { server_now, .. } => ((server_now >> 32) as u32, *server_now as u32),
            _ => (0, 0),
        };
        let message = match self {
            ShoalError::InvalidArgument(m)
            | ShoalError::NotFound(m)
            | ShoalError::Checksum(m)
            | ShoalError::NoSpace(m)
            | ShoalError::NoPermission(m)
            | ShoalError::Io(m)
            | ShoalError::Protocol(m)
            | ShoalError::Timeout(m)
            | ShoalError::Unreachable(m)
            | ShoalError::Busy(m)
            | ShoalError::Internal(m)
            | ShoalError::Conflict { message: m, .. }
            | ShoalError::Damaged(m) => m.clone(),
            ShoalError::StaleMap { .. } | ShoalError::Poisoned(_) => String::new(),
        };
        WireError { code: self.code(), a, b, message }
    }

    /// Rebuilds an error from its wire form. Unknown codes become
    /// [`ShoalError::Internal`] so that a newer peer never crashes an older one.
    pub fn from_wire(w: WireError) -> Self {
        let m = w.message;
        match w.code {
            1 => ShoalError::InvalidArgument(m),
            2 => ShoalError::NotFound(m),
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
            ShoalError::NotFound("x".into()),
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
        ];
        for e in all {
            assert_eq!(ShoalError::from_wire(e.to_wire()), e);
        }
    }
}
