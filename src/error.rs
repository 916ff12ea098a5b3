//! The one error type a user can see, shared by the TCP front end and the NATS wire.
//!
//! A `KvError` is a machine-readable [`ErrorCode`] plus the human text that follows
//! `ERROR ` on a TCP line (or fills `message` in a NATS failure reply). Keeping the
//! text with the code lets an error travel back through several hops unchanged:
//! `ERROR node c unavailable` reaches the client of the first node byte for byte.

use serde::{Deserialize, Serialize};

/// What kind of failure happened; the `error` field of a NATS failure reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The bucket does not exist.
    NotFound,
    /// No routing-table entry covers the bucket's first byte.
    NoRoute,
    /// The owning node (or the mesh itself) cannot be reached.
    Unavailable,
    /// The owning node did not answer in time.
    Timeout,
    /// The request was forwarded more than `max_hops` times.
    Loop,
    /// The request itself is malformed or breaks a limit.
    BadRequest,
    /// Anything else.
    Internal,
}

/// A failure a client sees: a code to branch on and the text to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct KvError {
    code: ErrorCode,
    message: String,
}

impl KvError {
    /// An error with an explicit code and text (the text must be one line).
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The bucket does not exist.
    pub fn not_found(bucket: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("bucket {bucket} not found"))
    }

    /// No routing-table entry for the bucket.
    pub fn no_route(bucket: &str) -> Self {
        Self::new(ErrorCode::NoRoute, format!("no route for bucket {bucket}"))
    }

    /// The owning node has no subscriber on NATS.
    pub fn node_unavailable(node: &str) -> Self {
        Self::new(ErrorCode::Unavailable, format!("node {node} unavailable"))
    }

    /// This node cannot reach NATS at all.
    pub fn mesh_unavailable() -> Self {
        Self::new(ErrorCode::Unavailable, "mesh unavailable")
    }

    /// The owning node did not answer within the request timeout.
    pub fn timed_out(node: &str) -> Self {
        Self::new(ErrorCode::Timeout, format!("node {node} timed out"))
    }

    /// A durable node's store (JetStream) could not store a write: nothing
    /// changed.
    pub fn store_unavailable() -> Self {
        Self::new(ErrorCode::Unavailable, "store unavailable")
    }

    /// A write was sent to `node`, but its answer was lost (the connection went
    /// away, or the reply was unreadable): it may or may not have been applied.
    pub fn outcome_unknown(node: &str) -> Self {
        Self::new(ErrorCode::Timeout, format!("node {node} outcome unknown"))
    }

    /// The bucket's byte range is moving to another node and the move did
    /// not finish in time: nothing was done.
    pub fn moving(bucket: &str) -> Self {
        Self::new(ErrorCode::Unavailable, format!("bucket {bucket} moving"))
    }

    /// The request made `max_hops` hops and would need another.
    pub fn routing_loop(bucket: &str) -> Self {
        Self::new(ErrorCode::Loop, format!("routing loop for bucket {bucket}"))
    }

    /// A malformed request or a broken limit.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// An unexpected failure inside the node.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    /// The code to branch on.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The text shown after `ERROR ` on a TCP line.
    pub fn message(&self) -> &str {
        &self.message
    }
}
